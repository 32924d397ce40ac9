"""The fleet (layer 2): hosts sharing one catalogue with placement and failover on etcd."""
