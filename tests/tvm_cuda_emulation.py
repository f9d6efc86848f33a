"""TVM-generated CUDA kernels run on the CPU: a PrimFunc's GPU schedule, as TVM builds it.

The hand-written kernels reach cuda_emulator.h as source; the TIR ones (dlight's schedules of
the norms and rope, the decode attention's own schedule) exist as CUDA C++ only once TVM has
generated it. This builds a PrimFunc for sm_90a with common-subexpression elimination off
(so every kernel parameter is a buffer or a shape variable, by name), takes each `__global__`
kernel from the generated source, reads its launch grid off the scheduled TIR (the extents
of its thread-bound loops, evaluated at the call's shape values) and runs the kernels one
after another in the emulator on numpy arrays, as the GPU would in one stream.
EntryEmulator does that for every call of a lowered Relax entry in order: a whole decode,
verify, draft or prefill step as built for the GPU, minus the VM's memory planning and the
CUDA graph capture. Each kernel is built with the model's TIR pipeline (grid_dependency.py)
and sees every buffer but the weights as poison until its griddepcontrol.wait, as if the
kernel before it were still running.
"""
from __future__ import annotations

import ast
import re

import numpy as np
import tvm
from tvm.sym.analyzer import Analyzer
import tvm_ffi

from cuda_emulator import EmulatedFunction

_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\) \{')
_AXES = {"blockIdx": 0, "threadIdx": 1}
DYNAMIC_SHARED_BYTES = 227 * 1024  # sm_90's opt-in limit per block


def generated_kernels(func: tvm.tirx.PrimFunc) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, source, [(C type, parameter name)]) of each kernel, in launch order."""
    from trimode.artifacts import resolve_target
    from trimode.compiler.cuda_env import cuda_build_context
    from trimode.compiler.grid_dependency import TIR_PIPELINE

    target = tvm.target.Target(resolve_target("cuda", "sm_90a"), host="llvm")
    with target, cuda_build_context(target), \
            tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target,
                          tir_pipeline=TIR_PIPELINE)  # as the model builds them: each kernel waits
    source = next(m for m in lib.mod.imports if m.kind == "cuda").inspect_source()
    # hand-written device functions the kernels call (T.cuda.func_call's source_code)
    device_code = "".join(dict.fromkeys(
        ast.literal_eval(literal) for literal in re.findall(r'source_code=("(?:[^"\\]|\\.)*")', func.script())))
    kernels = []
    for match in _KERNEL.finditer(source):
        body = source[match.start():source.index("\n}\n", match.end()) + 3]
        # g++ wants an attribute before the storage class `__shared__` stands for
        body = re.sub(r"__shared__ alignas\((\d+)\)", r"alignas(\1) __shared__", body)
        # dynamic shared memory: one static block-shared array of the most a block may opt into
        body = re.sub(r"extern __shared__ __align__\((\d+)\) (\w+) (\w+)\[\];",
                      rf"alignas(\1) __shared__ \2 \3[{DYNAMIC_SHARED_BYTES}];", body)
        params = []
        for p in match.group(2).split(","):
            c_type, name = p.replace("__restrict__", "").strip().rsplit(None, 1)
            params.append((c_type.strip(), name))
        kernels.append((match.group(1), device_code + body, params))
    return kernels


def launch_grids(func: tvm.tirx.PrimFunc) -> list[tuple[dict[str, tvm.tirx.PrimExpr], tvm.tirx.PrimExpr | None]]:
    """Per kernel (a nest of thread-bound loops), the extent of each thread tag, and the
    host-side condition it launches under (the prefill GEMM picks its kernel by the row
    count), None for always."""
    grids: list = []

    def walk(node, inside: bool, condition):
        if node is None:
            return
        if isinstance(node, (list, tvm_ffi.Array)):
            for child in node:
                walk(child, inside, condition)
            return
        if isinstance(node, tvm.tirx.IfThenElse) and not inside:
            both = (lambda c: c) if condition is None else (lambda c: tvm.tirx.all(condition, c))
            walk(node.then_case, inside, both(node.condition))
            walk(node.else_case, inside, both(tvm.tirx.Not(node.condition)))
            return
        tag = extent = None
        if isinstance(node, tvm.tirx.For) and node.thread_binding is not None:
            tag, extent = node.thread_binding.thread_tag, node.extent
        elif isinstance(node, tvm.tirx.AttrStmt) and node.attr_key == "thread_extent":
            tag, extent = node.node.thread_tag, node.value
        if tag is not None:
            if not inside:
                grids.append(({}, condition))
            grids[-1][0].setdefault(tag, extent)
            inside = True
        for field in ("body", "seq", "then_case", "else_case", "block", "init"):
            if hasattr(node, field):
                walk(getattr(node, field), inside, condition)

    walk(func.body, False, None)
    return grids


def _fold(expr, scalars: dict[str, int]) -> int:
    """A launch extent, launch condition or output dimension at the call's shape values (its
    variables looked up by name)."""
    analyzer = Analyzer()
    for var in tvm.tirx.analysis.undefined_vars(expr):
        analyzer.bind(var, tvm.tirx.IntImm(str(var.ty), scalars[var.name]))
    folded = analyzer.simplify(expr)
    if not isinstance(folded, tvm.tirx.IntImm):  # a boolean folds to an IntImm too
        raise ValueError(f"launch extent {expr} did not fold to a constant ({folded})")
    return int(folded.value)


def run_primfunc(func: tvm.tirx.PrimFunc, buffers: dict[str, np.ndarray], scalars: dict[str, int],
                 reverse: bool = False, greedy: bool = False, kernels=None,
                 written_before: frozenset = frozenset()) -> None:
    """Runs every kernel of `func` on `buffers` (by buffer name; updated in place) with the
    shape and scalar variables `scalars` (by name); a kernel behind a host-side condition
    runs where the condition holds for them. written_before: the buffers (by name) that
    earlier kernels write, poison in each kernel until its griddepcontrol.wait."""
    kernels, grids = kernels or generated_kernels(func), launch_grids(func)
    assert len(kernels) == len(grids), (len(kernels), len(grids))
    for (name, source, params), (grid, condition) in zip(kernels, grids):
        if condition is not None and not _fold(condition, scalars):
            continue
        dims = [[1, 1, 1], [1, 1, 1]]
        for tag, extent in grid.items():
            axis, letter = tag.split(".")
            dims[_AXES[axis]]["xyz".index(letter)] = _fold(extent, scalars)
        args, pending = [], []
        for index, (c_type, param) in enumerate(params):
            if c_type.endswith("*"):
                args.append(buffers[param.removesuffix("_ptr")])
                if param.removesuffix("_ptr") in written_before:
                    pending.append(index)
            else:
                args.append(scalars[param])
        EmulatedFunction(source, name, [c for c, _ in params])(
            dims[0], dims[1], *args, reverse=reverse, greedy=greedy, written_before=tuple(pending))


# --- a whole compiled entry: its Relax bindings in order, every kernel emulated ------------

def _split_top(text: str) -> list[str]:
    """Comma-separated parts of `text`, commas inside brackets left alone."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def signature(func: tvm.tirx.PrimFunc) -> list[tuple[str, list[str] | None]]:
    """(name, dims as printed, or None for a scalar) of each parameter, read off the
    function's TVMScript (this TVM's Python API does not expose its buffer map)."""
    text = func.script()
    head = re.search(r"def \w+\((.*?)\):\n", text, re.S).group(1)
    params = []
    for part in _split_top(head):
        name, annotation = (s.strip() for s in part.split(":", 1))
        buffer = re.match(r"T\.Buffer\(\((.*?)\),", annotation, re.S)
        params.append((name, _split_top(buffer.group(1)) if buffer else None))
    return params


class EntryEmulator:
    """Runs one Relax function of a lowered module (dataflow bindings of call_tir and
    call_tir_inplace, as after FuseTIR and the GPU schedules) with every PrimFunc's CUDA
    emulated: what the GPU would compute, without its VM, memory planning or graphs."""

    def __init__(self, mod: tvm.IRModule):
        self.mod = mod
        self._compiled = {}
        self._weights: set[int] = set()  # ids of the weight arrays (the packed parameters)

    def run(self, name: str, args: list) -> object:
        from tvm import relax

        func = self.mod[name]
        env = {}
        shape_values = {}
        for param, value in zip(func.params, args):
            env[param] = value
            if isinstance(value, (list, tuple)):
                self._weights |= {id(array) for array in value}
            info = param.ty
            dims = info.shape.values if isinstance(info, relax.TensorType) and isinstance(value, np.ndarray) \
                else info.values if isinstance(info, relax.ShapeType) else ()
            sizes = value.shape if isinstance(value, np.ndarray) else value  # a shape argument: ints
            for dim, size in zip(dims, sizes):
                if isinstance(dim, tvm.tirx.Var):
                    shape_values[dim.name] = size
        for block in func.body.blocks:
            for binding in block.bindings:
                env[binding.var] = self._evaluate(binding.value, env, shape_values)
        return self._evaluate(func.body.body, env, shape_values)

    def _evaluate(self, expr, env, shape_values):
        from tvm import relax

        if isinstance(expr, tvm.tirx.IntImm):  # a scalar argument (the layer index)
            return int(expr.value)
        if expr in env:  # a parameter or an earlier binding
            return env[expr]
        if isinstance(expr, relax.TupleGetItem):
            return self._evaluate(expr.tuple_value, env, shape_values)[expr.index]
        if isinstance(expr, relax.Tuple):
            return tuple(self._evaluate(f, env, shape_values) for f in expr.fields)
        if isinstance(expr, relax.Call) and expr.op.name in ("relax.call_tir", "relax.call_tir_inplace"):
            return self._call(expr, env, shape_values)
        raise NotImplementedError(f"cannot emulate {type(expr).__name__}: {str(expr)[:200]}")

    def _call(self, call, env, shape_values):
        from tvm import relax

        prim_func = self.mod[call.args[0]]
        args = [self._evaluate(a, env, shape_values) for a in call.args[1].fields]
        out_infos = call.ty_args[0]
        out_infos = list(out_infos.fields) if isinstance(out_infos, relax.TupleType) else [out_infos]
        inplace = list(call.attrs.inplace_indices) if call.op.name == "relax.call_tir_inplace" else [-1] * len(out_infos)
        outputs, fresh = [], []
        for info, alias in zip(out_infos, inplace):
            if alias >= 0:
                outputs.append(args[alias])
                continue
            shape = [_fold(dim, shape_values) for dim in info.shape.values]
            dtype = str(info.dtype)
            array = np.full(shape, np.nan if dtype.startswith("float") else -1, dtype=dtype)
            outputs.append(array)
            fresh.append(array)
        buffers, scalars, written_before = {}, dict(shape_values), set()
        for (name, dims), value in zip(signature(prim_func), args + fresh):
            if dims is None:
                scalars[name] = value
                continue
            buffers[name] = value
            if id(value) not in self._weights:  # the weights alone may be read before the wait
                written_before.add(name)
            for dim, size in zip(dims, value.shape):
                if re.fullmatch(r"\w+", dim):
                    scalars[dim] = size
        run_primfunc(prim_func, buffers, scalars, kernels=self._kernels(prim_func),
                     written_before=frozenset(written_before))
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    def _kernels(self, prim_func):
        key = tvm_ffi.structural_hash(prim_func)
        if key not in self._compiled:
            self._compiled[key] = generated_kernels(prim_func)
        return self._compiled[key]
