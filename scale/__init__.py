"""Scale-out: several plain server replicas behind a gRPC load balancer (Envoy or client-side)."""
