"""What the Triton CPU interpreter (``TRITON_INTERPRET=1``) lacks and our kernels use.

Triton 3.6's interpreter cannot run a tensor descriptor's ``atomic_add`` (on the GPU, a TMA bulk
reduce-add: ``cp.reduce.async.bulk.tensor``); it fails with "'InterpreterBuilder' object has no
attribute 'create_descriptor_reduce'". ``add_descriptor_reduce`` gives it one with the hardware's
meaning for additions: every element of the box that lies inside the tensor's shape is added to
memory (relaxed), the rest is dropped. Nothing changes where the interpreter already has it.
"""
from __future__ import annotations


def add_descriptor_reduce() -> None:
    """Teach the interpreter ``tensor_descriptor.atomic_add`` (integer and float additions)."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"tensor descriptor reduction {kind} in the interpreter")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        self.create_atomic_rmw(op, ptrs, value, interpreter.TensorHandle(mask, tl.int1),
                               ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    builder.create_descriptor_reduce = create_descriptor_reduce
