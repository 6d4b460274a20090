"""mmtrace: where multimodal LLMs store facts and how they move them (Basu et al., NeurIPS 2024), at cluster scale.

The repository's top-level folders are this package's subpackages: `mmtrace.workers` (beside a resident
model), `mmtrace.cluster` (where work runs) and `mmtrace.jobs` (what a user asks for).
"""

__version__ = "0.1.0"
