"""The cluster side of a node: reachability of peers, its RPC methods, the control socket,
and the local cluster launcher (``dfs cluster up``)."""
