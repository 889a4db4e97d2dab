"""Command groups beyond train/eval/plot/compare, one module each, registered in bnctl/cli.py."""
