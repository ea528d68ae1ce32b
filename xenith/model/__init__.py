"""The Xenith decoder and its parts."""
