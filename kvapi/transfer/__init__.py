"""KV page transfer between engines (shm, ucx, tcp backends): see the microserving-calls work."""
