"""The writer actors: a home's Ray and channel surface (``actor``), each key's queue (``queue``), the
bookkeeping of a restart (``recovery``), its access to staged bytes (``staged``) and its I/O (``io``);
the writers of a node's staged saves whose keys' homes run elsewhere (``node_writer``).

Nothing is imported here: a module of this package imports its siblings by their full names.
"""
