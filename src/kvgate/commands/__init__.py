"""Thin command modules behind `kvgate <command>`; each exposes ``main(argv) -> int``."""
