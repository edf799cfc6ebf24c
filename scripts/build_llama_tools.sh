#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-diffusion-cli once, CPU only, from the llama.cpp source
# that the installed llama-cpp-python vendors, into .work/llamacpp/build/bin (ignored by git). tests/test_imatrix.py
# runs llama-quantize on our imatrix when it is there; bench/llamacpp.py uses llama-imatrix for the plain-text
# imatrix; tests/test_llama_diffusion_cli.py and bench/llamacpp_steps.py run llama-diffusion-cli (examples/diffusion,
# hence LLAMA_BUILD_EXAMPLES=ON; only the named targets are built). About 20 minutes on a busy 2-core machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$ROOT/.work/llamacpp"
VERSION="$(python -c 'import llama_cpp; print(llama_cpp.__version__)')"
mkdir -p "$WORK"
cd "$WORK"
if [ ! -d src ]; then
    pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d .
    tar xzf "llama_cpp_python-$VERSION.tar.gz" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "llama_cpp_python-$VERSION/vendor/llama.cpp" src
    rm -rf "llama_cpp_python-$VERSION"
fi
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build build -j"$(nproc)" --target llama-quantize llama-imatrix llama-diffusion-cli
ls -l build/bin/llama-quantize build/bin/llama-imatrix build/bin/llama-diffusion-cli
