from qdllm_export.cli import main

main()
