"""Bootstrap run as ``python -I -S -B _sandbox_child.py CONFIG_JSON`` by :mod:`rlsedit.eval.sandbox`.

It runs in the fresh, single-threaded child before any untrusted code: it lowers resource
limits, detaches from the network where the kernel allows it, confines the file system
with Landlock, reports what it applied on the inherited pipe, and then executes the
program file in a fresh ``__main__`` namespace. Every step is irreversible for the process
and its descendants. Standard library only (the child has no ``site-packages``).
"""

import ctypes
import json
import os
import resource
import struct
import sys
import traceback

# Landlock (linux/landlock.h). Syscall numbers are the same on every architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1_ALL = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def set_limits(limits):
    applied = []
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_FSIZE", limits["file_bytes"]),
                        ("RLIMIT_NPROC", limits["max_processes"])):
        if value is None:
            continue
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(getattr(resource, name), (value, hard))
        applied.append(f"{name}={value}")
    return applied


def leave_network():
    # a new user namespace makes the new network namespace possible without privileges;
    # the new network namespace has only a loopback device, and it is down
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return f"no network namespace (errno {ctypes.get_errno()})"
    return "network namespace"


def landlock(work, read_paths):
    abi = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    if abi < 1:
        return [f"no landlock (errno {ctypes.get_errno()})"]
    fs = FS_ABI1_ALL | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return [f"no landlock (create_ruleset errno {ctypes.get_errno()})"]

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not os.path.isdir(path):
                rights &= FILE_RIGHTS
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights & fs, fd), 12)
            if libc.syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), rule,
                            ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        finally:
            os.close(fd)

    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for path in read_paths:
        allow(path, read)
    allow("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE)
    allow(work, fs)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    applied = [f"landlock abi {abi}: writes only below the work dir, reads only below {len(read_paths)} system paths"]
    if net:
        applied.append("landlock: TCP bind/connect denied")
    if scoped:
        applied.append("landlock: no signals or abstract unix sockets outside the sandbox")
    return applied


def main():
    config = json.loads(sys.argv[1])
    applied = set_limits(config["limits"])
    if config["isolate_network"]:
        applied.append(leave_network())
    applied += landlock(config["work"], config["read_paths"])
    with os.fdopen(config["report_fd"], "w") as report:
        json.dump(applied, report)
    program = os.path.join(config["work"], config["program"])
    with open(program, encoding="utf-8") as handle:
        code = compile(handle.read(), program, "exec")
    namespace = {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except BaseException:  # SystemExit too: leaving before the checks ran is not a pass
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # the pass marker is written only after the whole program ran; an early os._exit(0)
    # by the program leaves it unwritten
    os.write(config["result_fd"], b"completed")
    os._exit(0)


if __name__ == "__main__":
    main()
