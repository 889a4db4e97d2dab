"""One module per command (train, eval, plot, compare, runs, sweep, report, study); bnctl/cli.py assembles them."""
