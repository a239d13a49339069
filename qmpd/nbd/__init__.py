"""NBD server: the sans-I/O wire codec (protocol) and the asyncio server with its exports."""
