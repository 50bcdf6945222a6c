package main

import (
	"fmt"
	"os"
	"path/filepath"
)

type nodeFlags struct {
	name, runtime, dns, podCIDR string
}

// startNode runs kubelet and kube-proxy for one node whose state lives under dir/node.
func startNode(children *group, self, dir, kubeconfig, address string, node nodeFlags) error {
	if node.runtime == "" || node.dns == "" {
		return fmt.Errorf("--node needs --runtime-endpoint and --cluster-dns")
	}
	root := filepath.Join(dir, "node")
	for _, sub := range []string{"kubelet", "pod-logs"} {
		if err := os.MkdirAll(filepath.Join(root, sub), 0o755); err != nil {
			return err
		}
	}
	// Pods resolve through the cluster's DNS only: nothing outside the test's network.
	resolv := filepath.Join(root, "resolv.conf")
	if err := os.WriteFile(resolv, []byte("nameserver "+node.dns+"\n"), 0o644); err != nil {
		return err
	}
	kubeletConfig := filepath.Join(root, "kubelet.yaml")
	if err := os.WriteFile(kubeletConfig, []byte(fmt.Sprintf(kubeletYAML,
		node.runtime, node.dns, resolv, filepath.Join(root, "pod-logs"))), 0o644); err != nil {
		return err
	}
	if err := children.start(self, dir, "kubelet",
		"--config="+kubeletConfig,
		"--kubeconfig="+kubeconfig,
		"--root-dir="+filepath.Join(root, "kubelet"),
		"--hostname-override="+node.name,
		"--node-ip="+address,
		"--v=1",
	); err != nil {
		return err
	}
	proxyConfig := filepath.Join(root, "kube-proxy.yaml")
	if err := os.WriteFile(proxyConfig, []byte(fmt.Sprintf(proxyYAML,
		kubeconfig, node.name, node.podCIDR)), 0o644); err != nil {
		return err
	}
	return children.start(self, dir, "proxy", "--config="+proxyConfig, "--v=1")
}

// The kubelet of a test node: cgroup v1 with the cgroupfs driver (what this kind of machine
// has; containerd 1.x does not report its driver), no swap check, the apiserver trusted to
// call it, and no eviction or image garbage collection over a shared disk's free space.
const kubeletYAML = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: %s
clusterDomain: cluster.local
clusterDNS: [%s]
resolvConf: %s
podLogsDir: %s
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
readOnlyPort: 0
healthzPort: 0
evictionHard: {memory.available: "1Mi", nodefs.available: "0%%", imagefs.available: "0%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
`

// kube-proxy in iptables mode, leaving the kernel's conntrack limits as they are (a network
// namespace cannot change them).
const proxyYAML = `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %s}
hostnameOverride: %s
clusterCIDR: %s
mode: iptables
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
`
