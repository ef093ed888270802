-- Runs once, when the data volume is first initialised: EMK's vector search needs pgvector.
CREATE EXTENSION IF NOT EXISTS vector;
