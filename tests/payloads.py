"""Pickles that run code when a reader lets them: what a crafted checkpoint's metadata holds."""
import os
import pickle


def _os_system(command: str, protocol: int) -> bytes:
    """A pickle that calls os.system(command) when loaded unguarded."""
    class Payload:
        def __reduce__(self):
            return (os.system, (command,))
    return pickle.dumps(Payload(), protocol=protocol)


def _dotted(module: str, name: str, command: str, opcode: str) -> bytes:
    """A pickle that looks up ``name`` (dotted) from ``module`` and calls it with ``command``:
    STACK_GLOBAL or GLOBAL inside a protocol-4 stream, where pickle resolves the dots."""
    arg = command.encode()
    if opcode == "STACK_GLOBAL":
        lookup = b"".join(b"\x8c" + bytes([len(x)]) + x for x in (module.encode(), name.encode())) + b"\x93"
    else:
        lookup = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return b"\x80\x04" + lookup + b"\x8c" + bytes([len(arg)]) + arg + b"\x85R."


# BUILD on the class PosixPath itself: (None, {"x_poisoned": 1}) as slot state sets a class
# attribute for the rest of the process, though nothing is called
POISON = (b"\x80\x04cpathlib\nPosixPath\nN}\x8c\nx_poisonedK\x01s\x86b.")


def crafted_payloads(marker) -> dict[str, bytes]:
    command = f"touch {marker}"
    payloads = {f"os.system, protocol {p}": _os_system(command, p) for p in range(6)}
    for opcode in ("STACK_GLOBAL", "GLOBAL"):
        payloads[f"dotted os.system ({opcode})"] = _dotted("torch.distributed.checkpoint.filesystem", "os.system",
                                                          command, opcode)
        payloads[f"dotted sys.modules ({opcode})"] = _dotted("torch.distributed.checkpoint.metadata",
                                                              "dataclasses.sys.modules", command, opcode)
    # a helper of DCP's own package that reads a file with torch.load(weights_only=False)
    payloads["format_utils helper"] = _dotted("torch.distributed.checkpoint.format_utils", "dcp_to_torch_save",
                                              command, "STACK_GLOBAL")
    payloads["a record class by a dotted name"] = _dotted("torch.distributed.checkpoint", "metadata.Metadata",
                                                         command, "STACK_GLOBAL")
    payloads["attributes set on an admitted class"] = POISON
    return payloads
