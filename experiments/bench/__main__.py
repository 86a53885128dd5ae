from experiments.bench.cli import main

main()
