"""The ``tripletlab`` command line, above every package it dispatches to."""
