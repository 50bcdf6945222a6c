// Command testcluster runs a real Kubernetes control plane on loopback for Amber's tests.
//
// One binary, several roles. `testcluster up --dir DIR` starts an embedded etcd in its own
// process, then runs kube-apiserver, kube-controller-manager and (optionally) kube-scheduler
// as child processes of itself (`testcluster apiserver ...` and so on): the apiserver's
// signal handling may only be set up once per process. It writes DIR/kubeconfig (admin
// token) and, once the apiserver is ready, DIR/ready. SIGTERM or SIGINT stops everything.
//
// With --node NAME it also runs a real node: kubelet against a CRI socket (containerd) and
// kube-proxy, both from the same Kubernetes release (`testcluster kubelet|proxy ...`).
// The caller provides the container runtime, the CNI plugins and cluster DNS, and usually
// runs the whole command inside a network namespace of its own (tests/node.py).
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// Controllers the tests need: Jobs and their pods, garbage collection through owner
// references, namespace deletion, service accounts, and Deployments for the Helm chart.
const controllers = "job,garbagecollector,namespace,serviceaccount,serviceaccount-token,deployment,replicaset"

// A real node also needs the Services' endpoints (kube-proxy and cluster DNS read them) and
// the controller that lifts a new node's not-ready taint once it reports Ready, and the
// cluster's CA in every namespace for the pods' ServiceAccount tokens.
const nodeControllers = controllers + ",endpointslice,nodelifecycle,root-ca-cert-publisher"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testcluster up|apiserver|controller-manager|scheduler|kubelet|proxy [flags]")
		os.Exit(2)
	}
	role, args := os.Args[1], os.Args[2:]
	switch role {
	case "apiserver":
		os.Exit(run(apiserver.NewAPIServerCommand(), args))
	case "controller-manager":
		os.Exit(run(controllermanager.NewControllerManagerCommand(), args))
	case "scheduler":
		os.Exit(run(scheduler.NewSchedulerCommand(), args))
	case "kubelet":
		os.Exit(run(kubelet.NewKubeletCommand(context.Background()), args))
	case "proxy":
		os.Exit(run(proxy.NewProxyCommand(), args))
	case "up":
		if err := up(args); err != nil {
			fmt.Fprintln(os.Stderr, "testcluster:", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown role", role)
		os.Exit(2)
	}
}

func run(cmd *cobra.Command, args []string) int {
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

type readyInfo struct {
	Server     string `json:"server"`
	Kubeconfig string `json:"kubeconfig"`
	Token      string `json:"token"`
	PID        int    `json:"pid"`
}

func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "", "state folder (etcd data, certificates, kubeconfig, logs)")
	withScheduler := fs.Bool("scheduler", true, "run kube-scheduler")
	timeout := fs.Duration("timeout", 120*time.Second, "how long to wait for readiness")
	address := fs.String("address", "127.0.0.1", "the address the apiserver listens on and advertises")
	var node nodeFlags
	fs.StringVar(&node.name, "node", "", "run a real node of this name (kubelet and kube-proxy)")
	fs.StringVar(&node.runtime, "runtime-endpoint", "", "the node's CRI socket (unix:///...)")
	fs.StringVar(&node.dns, "cluster-dns", "", "the address of the cluster's DNS server, given to pods")
	fs.StringVar(&node.podCIDR, "pod-cidr", "10.244.0.0/16", "the pod network, for kube-proxy")
	_ = fs.Parse(args)
	if *dir == "" {
		return fmt.Errorf("--dir is required")
	}
	absDir, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(absDir, 0o755); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(absDir, "ready"))

	token, err := writeCredentials(absDir)
	if err != nil {
		return err
	}
	etcd, etcdURL, err := startEtcd(absDir)
	if err != nil {
		return err
	}
	defer etcd.Close()

	port, err := freePort()
	if err != nil {
		return err
	}
	server := fmt.Sprintf("https://%s:%d", *address, port)
	kubeconfig := filepath.Join(absDir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, token); err != nil {
		return err
	}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	children := &group{}
	defer children.stop()
	key := filepath.Join(absDir, "sa.key")
	// The default reconciler refuses a loopback endpoint for the kubernetes Service; a node's
	// pods reach the apiserver through that Service, so there it must be the real one.
	reconciler := "none"
	if node.name != "" {
		reconciler = "lease"
	}
	if err := children.start(self, absDir, "apiserver",
		"--etcd-servers="+etcdURL,
		"--bind-address="+*address,
		"--advertise-address="+*address,
		fmt.Sprintf("--secure-port=%d", port),
		"--cert-dir="+filepath.Join(absDir, "certs"),
		"--token-auth-file="+filepath.Join(absDir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+key,
		"--service-account-signing-key-file="+key,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--allow-privileged=true",
		"--endpoint-reconciler-type="+reconciler,
		// The apiserver reaches a kubelet (logs, exec) by its address: nothing resolves its name.
		"--kubelet-preferred-address-types=InternalIP",
		"--v=1",
	); err != nil {
		return err
	}
	if err := waitReady(server, token, *timeout, children); err != nil {
		return err
	}
	enabled := controllers
	if node.name != "" {
		enabled = nodeControllers
	}
	if err := children.start(self, absDir, "controller-manager",
		"--kubeconfig="+kubeconfig,
		"--controllers="+enabled,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--service-account-private-key-file="+key,
		"--root-ca-file="+filepath.Join(absDir, "certs", "apiserver.crt"),
		"--concurrent-job-syncs=10",
		"--v=1",
	); err != nil {
		return err
	}
	if *withScheduler {
		if err := children.start(self, absDir, "scheduler",
			"--kubeconfig="+kubeconfig,
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
			"--secure-port=0",
			"--v=1",
		); err != nil {
			return err
		}
	}

	if node.name != "" {
		if err := startNode(children, self, absDir, kubeconfig, *address, node); err != nil {
			return err
		}
	}

	info, _ := json.Marshal(readyInfo{server, kubeconfig, token, os.Getpid()})
	if err := os.WriteFile(filepath.Join(absDir, "ready"), info, 0o644); err != nil {
		return err
	}
	fmt.Println("ready", server)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	select {
	case sig := <-signals:
		fmt.Println("stopping on", sig)
		_ = os.Remove(filepath.Join(absDir, "ready"))
		return nil
	case name := <-children.exited:
		_ = os.Remove(filepath.Join(absDir, "ready"))
		return fmt.Errorf("%s exited; see %s", name, filepath.Join(absDir, name+".log"))
	}
}

func writeCredentials(dir string) (string, error) {
	raw := make([]byte, 16)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	token := hex.EncodeToString(raw)
	line := fmt.Sprintf("%s,admin,admin,\"system:masters\"\n", token)
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(line), 0o600); err != nil {
		return "", err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", err
	}
	block := &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}
	return token, os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(block), 0o600)
}

func writeKubeconfig(path, server, token string) error {
	config := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: testcluster
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: %s
contexts:
- name: testcluster
  context: {cluster: testcluster, user: admin, namespace: default}
current-context: testcluster
`, server, token)
	return os.WriteFile(path, []byte(config), 0o600)
}

func startEtcd(dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.LogLevel = "fatal" // its shutdown reports closed listeners as errors
	client, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", clientPort))
	peer, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", peerPort))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// Tests create and delete quickly; keep the store small.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "5m"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, client.String(), nil
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", fmt.Errorf("etcd did not become ready")
	}
}

func waitReady(server, token string, timeout time.Duration, children *group) error {
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case name := <-children.exited:
			return fmt.Errorf("%s exited before the apiserver was ready", name)
		default:
		}
		req, _ := http.NewRequest(http.MethodGet, server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("apiserver not ready after %s", timeout)
}

// group runs child processes that die with their parent (Pdeathsig) and reports exits.
type group struct {
	procs  []*exec.Cmd
	exited chan string
}

func (g *group) start(self, dir, role string, args ...string) error {
	if g.exited == nil {
		g.exited = make(chan string, 8)
	}
	logFile, err := os.Create(filepath.Join(dir, role+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(self, append([]string{role}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", role, err)
	}
	g.procs = append(g.procs, cmd)
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		g.exited <- role
	}()
	return nil
}

func (g *group) stop() {
	// Reverse order: scheduler and controllers before the apiserver they talk to.
	for i := len(g.procs) - 1; i >= 0; i-- {
		cmd := g.procs[i]
		if cmd.Process == nil || cmd.ProcessState != nil {
			continue
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() {
			for cmd.ProcessState == nil {
				if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			close(done)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		select {
		case <-done:
		case <-ctx.Done():
			_ = cmd.Process.Kill()
		}
		cancel()
	}
}
