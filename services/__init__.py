"""Sightline: face recognition as event-driven microservices (capture, detection, embedding, matching, decision)."""

import os

# Before anything imports grpc. The local stack starts its processes with a preexec_fn (to tie them to their owner),
# which makes subprocess fork() instead of vfork(); with gRPC's fork support on, the child restarts gRPC's poller
# thread, close_fds then closes its epoll descriptor, and the child aborts before exec (SIGABRT, "epoll_wait error:
# Bad file descriptor"; grpc/grpc#43055). No Sightline process forks a child that keeps using gRPC, so it is off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
