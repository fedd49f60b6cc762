"""What the benchmarks share: the built artifacts, a VM running the agent's device self-test
service (cocoon.selftest=1, vsock port 1025) and the figures' summary line."""
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.environ.get("COCOON_KERNEL", os.path.join(ROOT, "build/vmlinux"))
INITRD = os.environ.get("COCOON_INITRD", os.path.join(ROOT, "build/initramfs.cpio"))
VMM = os.environ.get("COCOON_VMM", os.path.join(ROOT, "target/release/cocoon-vmm"))
SELFTEST_PORT = 1025


def require_artifacts():
    for path in (KERNEL, INITRD, VMM):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make bench`")


def summary(values, fmt="{:.2f}"):
    return (f"median {fmt.format(statistics.median(values))}  "
            f"min {fmt.format(min(values))}  max {fmt.format(max(values))}")


def both_ways(runs, to_guest, from_guest, title, label):
    """Runs `to_guest()` and `from_guest()` (each returning MiB/s) `runs` times and prints the
    figures under `title`, each line starting with `label`."""
    up, down = [], []
    for i in range(runs):
        up.append(to_guest())
        down.append(from_guest())
        print(f"run {i + 1}/{runs}: host->guest {up[-1]:.2f} MiB/s, "
              f"guest->host {down[-1]:.2f} MiB/s", file=sys.stderr)
    print(title)
    print(f"{label} host -> guest (MiB/s)  {summary(up)}")
    print(f"{label} guest -> host (MiB/s)  {summary(down)}")


def connect(uds, port):
    """A stream to guest `port` through the VMM's vsock socket, or None if nobody listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            s.close()
            return None
        reply += chunk
    return s if reply.startswith(b"OK ") else None


def command(uds, line, then=None):
    """Sends one self-test command and returns its reply line; with `then`, calls it after the
    first reply and returns the second."""
    s = connect(uds, SELFTEST_PORT)
    if s is None:
        return None
    s.sendall(line.encode() + b"\n")
    f = s.makefile("rb")
    reply = f.readline().decode().strip()
    if then is not None:
        then()
        reply = f.readline().decode().strip()
    s.close()
    return reply


class SelftestVm:
    """A VM with the self-test service, from boot until power-off (killed if anything fails)."""

    def __init__(self, extra_args=()):
        self.extra_args = list(extra_args)

    def __enter__(self):
        require_artifacts()
        self.tmp = tempfile.TemporaryDirectory()
        self.uds = os.path.join(self.tmp.name, "v.sock")
        self.vmm = subprocess.Popen([VMM, "--kernel", KERNEL, "--initrd", INITRD, "--console", "off",
                                     "--vsock", f"3,{self.uds}", "--cmdline", "cocoon.selftest=1",
                                     *self.extra_args])
        deadline = time.monotonic() + 180
        while True:
            try:
                s = connect(self.uds, SELFTEST_PORT)
                if s:
                    s.close()
                    return self
            except OSError:
                pass
            if self.vmm.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                sys.exit("the guest's self-test service never came up")
            time.sleep(0.3)

    def __exit__(self, *_):
        if self.vmm.poll() is None:
            try:
                command(self.uds, "POWEROFF")
                self.vmm.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.vmm.kill()
                self.vmm.wait()
        self.tmp.cleanup()


def pin_cocoon(dest, cocoon):
    """Copies the cocoon binary, the guest kernel and the initramfs into `dest` and returns the
    copy of the binary and an environment that has cocoon use the copies. A template's inputs
    include these files (path, size, mtime), so a rebuild of one while a benchmark runs (by
    anyone sharing the checkout) would have the next sandbox make the template anew; with
    copies, every sandbox of the run restores the template the run made."""
    import shutil
    pinned = {}
    for name, path in (("cocoon", cocoon), ("vmlinux", KERNEL), ("initramfs.cpio", INITRD)):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make bench`")
        pinned[name] = os.path.join(dest, name)
        shutil.copy2(os.path.realpath(path), pinned[name])
    env = dict(os.environ, COCOON_KERNEL=pinned["vmlinux"], COCOON_INITRD=pinned["initramfs.cpio"],
               COCOON_BIN=pinned["cocoon"])
    return pinned["cocoon"], env
