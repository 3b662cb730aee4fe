"""Real deployment: a Flower SuperLink (``medgen-server``) and one SuperNode per site
(``medgen-client``), spawned as child processes, with TLS and SuperNode authentication."""
