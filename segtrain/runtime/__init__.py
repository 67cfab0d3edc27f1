"""The process and its cluster: the strategy, the cluster's description and its mistakes, the
lock on a run directory, the watchdog of a cluster that does not form. What a command needs
whether it trains or not."""
