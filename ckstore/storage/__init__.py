"""The only code that touches the disk: durable (hooked, fsynced) writes, safe reads, the store layout, the locks."""
