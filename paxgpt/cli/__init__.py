"""The `paxgpt` command line: argument and gin parsing, the error contract
(main.py) and one thin function per command (commands.py). The library
modules under paxgpt/ and tasks/ define no commands; they raise, and
main.py reports."""
