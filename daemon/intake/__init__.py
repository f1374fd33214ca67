"""What comes in: inbox rules (names, `.mode` files, what is ignored), the inbox watcher, safe photo decoding."""
