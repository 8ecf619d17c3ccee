"""`python -m linmu_cli ...` (also what `accelerate launch -m linmu_cli` runs)."""

from linmu_cli.cli import main

main()
