"""The commands of the `segtrain` command line, one module each: thin functions that parse the
run's configuration and call the layers below (experiment, train, data)."""
