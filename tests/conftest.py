pytest_plugins = ["tests.servers", "tests.stores", "tests.pg_server"]
