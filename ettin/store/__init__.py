"""What is on disk and how it is written: run directories (``RunDir``, ``RunLock``), checkpoints
(atomic, hashed, ordered by the token clock; ``checkpoints``) and the one atomic-publish helper
(``fs``).

May import: nothing else of ettin, so every other package may use it.
"""
