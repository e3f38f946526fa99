"""A Mem0 quickstart script, ported to memq: only the import and the constructor changed.

It follows Mem0 1.0.11's documented flow (add with and without inference and with a custom prompt,
search with operator filters, get_all, update, history, delete, reset) and prints every result as one
JSON object, so its shapes can be compared with Mem0's key for key (tests/test_mem0_parity.py).

Run it with a worker up (``memq worker``) and memq's settings in the environment (``MEMQ_*``).
"""

import json

from memq import Memory  # Mem0: from mem0 import Memory

m = Memory(user_id="alice", wait=True)  # Mem0: m = Memory()

out = {}

# Store a conversation, with metadata
messages = [
    {"role": "user", "content": "I'm planning to watch a movie tonight. Any recommendations?"},
    {"role": "assistant", "content": "How about thriller movies? They can be quite engaging."},
    {"role": "user", "content": "I'm not a big fan of thriller movies but I love sci-fi movies."},
    {"role": "assistant", "content": "Got it! I'll avoid thriller recommendations and suggest sci-fi movies in the future."},
]
out["add"] = m.add(messages, user_id="alice", metadata={"category": "movies", "priority": 2})

# Store a message as it is, without inference
out["add_raw"] = m.add([{"role": "user", "content": "My favourite director is Denis Villeneuve.", "name": "alice"}],
                       user_id="alice", infer=False, metadata={"category": "movies", "priority": 5})

# Store with a custom extraction prompt
out["add_prompt"] = m.add("I had sushi for lunch and I am allergic to peanuts.", user_id="alice",
                          prompt="Extract only facts about food and allergies.", metadata={"category": "food"})

# Search, with operator filters
out["search"] = m.search("What movies does alice like?", user_id="alice",
                         filters={"AND": [{"category": {"in": ["movies", "books"]}}, {"priority": {"gte": 1}}]})
out["search_or"] = m.search("food", user_id="alice",
                            filters={"OR": [{"category": "food"}, {"priority": {"gt": 4}}]}, limit=5)

# Everything
out["get_all"] = m.get_all(user_id="alice")

# Update a memory, then read its history
memory_id = out["add_raw"]["results"][0]["id"]
out["get"] = m.get(memory_id)
out["update"] = m.update(memory_id=memory_id, data="Alice's favourite director is Denis Villeneuve (Dune).")
out["history"] = m.history(memory_id=memory_id)

# Delete one memory, then everything
out["delete"] = m.delete(memory_id=memory_id)
out["get_all_after_delete"] = m.get_all(user_id="alice")
out["reset"] = m.reset()
out["get_all_after_reset"] = m.get_all(user_id="alice")

print(json.dumps(out, indent=1))
