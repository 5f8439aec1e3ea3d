"""The Conductor: KV-cache-aware, SLO-predicting P/D proxy and its trace-driven simulator."""
