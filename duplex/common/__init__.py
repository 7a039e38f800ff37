"""What every Duplex service does the same way: settings, logging, errors, server bootstrap, channels."""
