"""Pure stage logic of an add job (pydantic in, pydantic out), with no queue and no job state.

Stages, in order: `caption` -> `extract` -> `retrieve` + `decide` -> `apply` (vector and graph writes)
-> `finalize`; `llm` is the one seam to language models and `offline_model` the heuristic baseline.
`jobs.add` runs them as an add job's life; import the submodules directly.
"""

__all__: list[str] = []
