"""Cache writes as outputs: the in-place decode program for a runtime without mutation (ONNX).

`write_cache_in_place` leaves each entry a decode call extends as

    write_cache(past_X, new, slots)           attention reads past_X         (no output)

ONNX has no in-place write, so here each becomes a value the program returns:

    present_X = cache_written(past_X, new, slots)   attention reads present_X   output present_X

`cache_written` is a scatter of the new tokens (ScatterElements once exported). A runtime that
hands `present_X` the memory of `past_X` (onnxruntime's IOBinding, the `past_present_share_buffer`
pattern of its GroupQueryAttention) gets the in-place write back: the scatter moves the new tokens
only, and the step copies no byte of the cache (kvcompile/export/onnx_runtime.py).
"""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.kernels.ops import cache_written
from kvcompile.plan import Plan
from kvcompile.program import past, placeholder_name, present, signature_of

from .graph import PassError


def cache_writes_as_outputs(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    graph, sig = gm.graph, signature_of(gm)
    entries = {placeholder_name(name): name.removeprefix(past("")) for name in sig.inputs if name.startswith(past(""))}
    output = graph.output_node()
    outputs = list(output.args[0])
    order = {node: i for i, node in enumerate(graph.nodes)}
    for write in [node for node in graph.nodes if node.target == torch.ops.kvcompile.write_cache.default]:
        buffer, new, slots = write.args
        if buffer.op != "placeholder" or buffer.target not in entries:
            raise PassError(f"write_cache into {buffer.format_node()}, which is not a cache input of the program")
        with graph.inserting_before(write):
            written = graph.call_function(cache_written, (buffer, new, slots))
        # readers after the write read what it wrote; earlier ones (shapes) still read the input
        for user in [user for user in buffer.users if user is not write and order.get(user, -1) > order[write]]:
            user.replace_input_with(buffer, written)
        graph.erase_node(write)
        outputs.append(written)
        sig.outputs.append(present(entries[buffer.target]))
    output.args = (tuple(outputs),)
    return gm
