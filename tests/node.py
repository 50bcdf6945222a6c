"""A real Kubernetes node for the end-to-end tests that need real containers.

kubelet and kube-proxy come from the test cluster's binary (the same Kubernetes release as its
control plane: tests/cluster/node.go), containerd and runc from Debian's packages, pod
networking from the CNI bridge, host-local and loopback plugins, and cluster DNS from CoreDNS
(tests/cluster/build.sh). The images are the ones in images/, built by tests/images.sh and
imported into containerd without a registry.

Everything runs in a network namespace of its own, joined to this machine's by one veth pair:
the node is NODE_IP, this side HOST_IP, and pods get POD_SUBNET on the node's bridge. The
apiserver, CoreDNS and the test's S3 endpoint listen on the node's address, so pods reach them,
the tests reach them over the veth, and nothing in the namespace has a route anywhere else.
The node's processes join only that network namespace (nsenter), not a mount namespace of
their own: the volumes kubelet mounts must be the ones containerd's containers see.

containerd keeps its content and unpacked images in the cache outside the checkout, so a warm
run imports nothing; the containers and sandboxes of a run are removed when it stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil

from kube import Cluster, wait_for

HERE = Path(__file__).parent
NETNS = "amber-node"
NODE = "amber-node"
NODE_IP, HOST_IP = "10.213.0.2", "10.213.0.1"
POD_SUBNET = "10.244.0.0/24"
HOST_LINK, NODE_LINK = "amber-host", "amber-node"
CACHE = Path(os.environ.get("AMBER_CACHE", Path.home() / ".cache" / "amber"))
STATE = Path("/run/amber-node")  # containerd's state and socket (a tmpfs, as on a real node)
# The node's files (kubelet's root, configuration, logs): kept after a run for a look at what
# happened, replaced by the next run's.
NODE_DIR = Path("/var/lib/amber-node")
CNI_BIN = Path("/usr/lib/cni")
GC_TRIGGER = "amber.test/gc:collect"
PACKAGES = {  # Debian's packages the node needs: (a file each installs, package)
    "/usr/bin/containerd": "containerd",
    "/usr/sbin/runc": "runc",
    str(CNI_BIN / "bridge"): "containernetworking-plugins",
    "/usr/sbin/iptables": "iptables",
    "/usr/sbin/conntrack": "conntrack",
}


def in_node(*command: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{NETNS}", *command]


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(command)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def install_packages() -> None:
    missing = sorted({pkg for path, pkg in PACKAGES.items() if not Path(path).exists()})
    if missing:
        sh("apt-get", "update", "-qq")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


class Image(NamedTuple):
    archive: str  # a docker-archive, named by the hash of what the image is built from
    reference: str  # the name it is tagged with: the chart's default, the sandbox image


def build_images() -> dict[str, Image]:
    """tests/images.sh: the images by name (built on first use, cached)."""
    out = subprocess.run(["bash", str(HERE / "images.sh")], capture_output=True, text=True)
    sys.stderr.write(out.stderr)  # what was built, in the test's log
    if out.returncode:
        raise RuntimeError(f"tests/images.sh failed ({out.returncode}):\n{out.stderr[-3000:]}")
    images = {}
    for line in out.stdout.splitlines():
        name, rest = line.split("=", 1)
        images[name] = Image(*rest.split())
    return images


def sizes(images: dict[str, Image]) -> str:
    """The images' archive sizes, as `./tests/run` prints them at the end."""
    return ", ".join(
        f"{name} {os.path.getsize(image.archive) / 2**20:,.1f} MiB"
        for name, image in images.items()
    )


CONTAINERD = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This machine refuses a process an oom_score_adj below its parent's (kubelet asks -998
  # for sandboxes); keep it at containerd's own, as a rootless node does.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
"""

# Only what the cluster's names need: anything else is an immediate NXDOMAIN, never a lookup
# outside the test's network.
COREFILE = """cluster.local:53 {{
    bind {address}
    errors
    kubernetes cluster.local {{
        kubeconfig {kubeconfig}
        pods insecure
    }}
}}
.:53 {{
    bind {address}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


@dataclass
class Node:
    """A control plane and one real node, started together and stopped together."""

    binaries: dict[str, str]
    images: dict[str, Image]
    dir: Path = NODE_DIR
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    cluster: Cluster | None = None

    @property
    def socket(self) -> Path:
        return STATE / "containerd.sock"

    def start(self) -> Node:
        install_packages()
        self.clean()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._network()
        self._containerd()
        self._import_images()
        self.cluster = Cluster(
            self.dir / "cluster",
            self.binaries["testcluster"],
            args=(
                f"--address={NODE_IP}",
                f"--node={NODE}",
                f"--runtime-endpoint=unix://{self.socket}",
                f"--cluster-dns={NODE_IP}",
            ),
            prefix=tuple(in_node()),
            fake_node=False,
        )
        (self.dir / "cluster").mkdir(parents=True, exist_ok=True)
        self.cluster.start()
        self.cluster.binaries = self.binaries
        self._dns()
        wait_for(self._ready, 180, 1, "the node to be Ready")
        return self

    # --- the pieces, in the order they start

    def _network(self) -> None:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK)
        sh("ip", "link", "set", NODE_LINK, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_LINK)
        sh("ip", "link", "set", HOST_LINK, "up")
        sh(*in_node("ip", "addr", "add", f"{NODE_IP}/30", "dev", NODE_LINK))
        sh(*in_node("ip", "link", "set", NODE_LINK, "up"))
        sh(*in_node("ip", "link", "set", "lo", "up"))
        # What kubeadm's preflight asks of a node; the namespace starts with it off.
        sh(*in_node("sysctl", "-qw", "net.ipv4.ip_forward=1"))

    def _containerd(self) -> None:
        cni = self.dir / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-amber.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "amber",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "amber0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.dir / "ipam"),
                            },
                        }
                    ],
                }
            )
        )
        STATE.mkdir(parents=True, exist_ok=True)
        config = self.dir / "containerd.toml"
        config.write_text(
            CONTAINERD.format(
                root=CACHE / "containerd",
                state=STATE / "containerd",
                socket=self.socket,
                pause=self.images["pause"].reference,
                cni_bin=CNI_BIN,
                cni_conf=cni,
            )
        )
        self._spawn("containerd", *in_node("containerd", "--config", str(config)))
        wait_for(self.socket.exists, 60, 0.2, "containerd's socket")
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, 60, 0.5, "containerd")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, check=check)

    def _import_images(self) -> None:
        """Import each image whose archive (named by its inputs' hash) containerd has not
        imported under its name yet."""
        stamp = CACHE / "containerd" / "imported.json"
        imported = json.loads(stamp.read_text()) if stamp.exists() else {}
        present = set(self.ctr("images", "list", "--quiet").stdout.split())
        changed = False
        for name, image in self.images.items():
            if imported.get(image.reference) == image.archive and image.reference in present:
                continue
            start = time.monotonic()
            self.ctr("images", "import", image.archive)
            imported[image.reference] = image.archive
            stamp.write_text(json.dumps(imported))
            print(f"imported {name} in {time.monotonic() - start:.0f}s", file=sys.stderr)
            changed = True
        if changed:
            # An image imported under a name another held leaves that one's layers behind; a
            # synchronous delete runs containerd's garbage collection over everything.
            self.ctr("images", "tag", self.images["pause"].reference, GC_TRIGGER)
            self.ctr("images", "delete", "--sync", GC_TRIGGER)

    def _dns(self) -> None:
        corefile = self.dir / "Corefile"
        corefile.write_text(COREFILE.format(address=NODE_IP, kubeconfig=self.cluster.kubeconfig))
        self._spawn("coredns", *in_node(self.binaries["coredns"], "-conf", str(corefile)))

    def _ready(self) -> bool:
        try:
            node = self.cluster.core.read_node(NODE)
        except Exception:  # not registered yet
            return False
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    def _spawn(self, name: str, *command: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 - the process holds it
        self.procs[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.procs[name]

    def s3(self) -> str:
        """moto on the node's address: the S3 endpoint pods and tests share."""
        from trainer_helpers import moto_server

        return moto_server(NODE_IP, lambda command: self._spawn("s3", *in_node(*command)))[1]

    def kill_container(self, pod) -> None:
        """SIGKILL a pod's first container through containerd, as an OOM kill would."""
        container = pod.status.container_statuses[0].container_id.split("://", 1)[1]
        self.ctr("tasks", "kill", "--signal", "SIGKILL", container)

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text() if path.exists() else ""

    # --- stopping

    def stop(self) -> None:
        if self.cluster:
            self.cluster.stop()
        self.clean()

    def clean(self) -> None:
        """Stop whatever a node (this one, or one a killed run left) has running: containers,
        shims, containerd, CoreDNS, mounts, the network namespace."""
        if self.socket.exists():
            for task in self.ctr("tasks", "list", "--quiet", check=False).stdout.split():
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
            time.sleep(1)
            for task in self.ctr("tasks", "list", "--quiet", check=False).stdout.split():
                self.ctr("tasks", "delete", "--force", task, check=False)
            for container in self.ctr("containers", "list", "--quiet", check=False).stdout.split():
                self.ctr("containers", "delete", container, check=False)
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            del self.procs[name]
        # Leftovers of a run killed before its clean-up: processes still in the namespace.
        netns = Path(f"/run/netns/{NETNS}")
        if netns.exists():
            inode = netns.stat().st_ino
            for proc in psutil.process_iter():
                with contextlib.suppress(psutil.Error, OSError):
                    if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == inode:
                        proc.kill()
        for proc in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["name"] == "containerd-shim-runc-v2" and str(STATE) in " ".join(
                    proc.info["cmdline"] or []
                ):
                    proc.kill()
        self._unmount()
        for pod in self._pod_namespaces():
            sh("ip", "netns", "delete", pod, check=False)
        sh("ip", "netns", "delete", NETNS, check=False)
        sh("ip", "link", "delete", HOST_LINK, check=False)
        shutil.rmtree(STATE, ignore_errors=True)

    @staticmethod
    def _pod_namespaces() -> list[str]:
        """The network namespaces containerd made for pods and left behind when it was
        stopped: an address on the pod network, or (their node gone) nothing but loopback."""
        found = []
        for path in Path("/run/netns").glob("cni-*"):
            links = json.loads(sh("ip", "-n", path.name, "-j", "addr", check=False).stdout or "[]")
            addresses = [a["local"] for link in links for a in link.get("addr_info", [])]
            ours = any(a.startswith(POD_SUBNET.rsplit(".", 1)[0] + ".") for a in addresses)
            if ours or all(link["ifname"] == "lo" for link in links):
                found.append(path.name)
        return found

    def _unmount(self) -> None:
        roots = (str(STATE), str(self.dir), str(CACHE / "containerd"))
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(roots)
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            sh("umount", "-l", mount, check=False)
