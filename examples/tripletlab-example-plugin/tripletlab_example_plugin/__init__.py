"""An example tripletlab loss plugin; its losses register when tripletlab loads the entry point."""
