"""One module per `kvgate <command>`: its argparse parser and ``main(argv) -> int``, turning flags
into the settings of the library code that does the work. `support` holds what every command does
the same way (log level, error messages and exit codes, running until SIGINT/SIGTERM)."""
