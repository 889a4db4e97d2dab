from bnctl.cli import main

main()
