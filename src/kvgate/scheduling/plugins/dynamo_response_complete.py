"""`dynamo-response-complete`: the seed's cleanup plugin, kept so that its configs load unchanged.

In the seed this plugin frees the KV router's bookkeeping when a response ends. kvgate's
`kv-aware-scorer` frees its own requests on completion and on abort, so there is nothing left
for this plugin to do: configs that list it behave exactly like configs that don't.
"""

from __future__ import annotations

from kvgate.scheduling.framework import Plugin


class DynamoResponseComplete(Plugin):
    type_name = "dynamo-response-complete"
