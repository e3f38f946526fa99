"""An add job's life (`jobs.add`), the transitions it goes through (`jobs.transitions`), the ledger
that records them in Redis and SQL together (`jobs.ledger`), the clients it runs on (`jobs.clients`)
and operators' actions on jobs (`jobs.admin`). Import the submodules directly."""

__all__: list[str] = []
