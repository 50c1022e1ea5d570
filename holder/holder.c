/*
 * holder: the first process of an app container managed by the pod-activator
 * sidecar.
 *
 * The runtime (containerd, runc, kubelet) restarts a container whose first
 * process exits, which would throw the checkpoint away. So the container's
 * first process is this holder, with the app as its child; the holder stays
 * while the app is checkpointed (its processes gone) and restored.
 *
 *   holder --name NAME [--control DIR] -- CMD [ARG...]
 *
 * It serves the sidecar on DIR/NAME.sock (SOCK_SEQPACKET, one message per
 * request, NUL-separated fields):
 *
 *   manage              -> "app PID"   the sidecar now decides about app exits
 *   start               -> "app PID"   start the app again (a cold start)
 *   exec N,M.. ARGV +fds -> "exec PID" run ARGV here (CRIU, in the container's
 *                                      namespaces and cgroup) with the passed
 *                                      fds at numbers N, M, ...; a restored app
 *                                      is then our child (restore-sibling)
 *   adopt PID           -> "app PID"   PID is the app now (CRIU restored it
 *                                      as our child); if it ended already,
 *                                      "exited" follows at once
 *   exit STATUS         -> the app really ended: exit with STATUS
 *   release             -> unmanaged again: the next app exit ends the holder
 *
 * and tells it "exited PID WAITSTATUS" whenever the app's root process ends.
 * While unmanaged (no sidecar yet, or a bad annotation), it is a plain init:
 * it forwards signals and exits with the app's status. Once managed, an app
 * exit ends the holder only when the sidecar says so (a checkpoint kills the
 * app; that is not the end) or when the container is being stopped
 * (SIGTERM/SIGINT). Written in C, static: it runs in any image.
 *
 * CRIU runs here, so the injection gives the container CRIU's capabilities;
 * those the container would not have had without it are named in
 * POD_ACTIVATOR_APP_DROP_CAPS (e.g. "SYS_ADMIN,SYS_PTRACE"), and the app
 * started here loses them (bounding, effective, permitted, inheritable and
 * ambient sets) just before its exec. CRIU keeps them. A restored app gets
 * the credentials CRIU dumped, which already lack them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_MESSAGE 8192
#define MAX_FDS 8
#define MAX_ARGS 64

static char **app_argv;
/* The app's stdout and stderr: FIFOs in the control directory, relayed by us
 * to ours (the container's log). CRIU reopens a FIFO by its path at restore,
 * so a restored app writes to the log again; an inherited pipe would need
 * CRIU's inherit-fd, which fails when CRIU runs inside the container. */
static char out_path[2][108];
static int out_read[2] = {-1, -1};
static pid_t app_pid;
static int managed;
static int stopping;
static int sidecar = -1;
static sigset_t handled;

#define DROP_CAPS_ENV "POD_ACTIVATOR_APP_DROP_CAPS"
/* Bit N: capability N is taken from the app (DROP_CAPS_ENV). */
static unsigned long long app_drop;
static const char *const cap_names[CAP_LAST_CAP + 1] = {
	"CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
	"SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
	"NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
	"SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
	"SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
	"AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
	"BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
};

static void say(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "holder: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static int exit_code(int status)
{
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

/* Read DROP_CAPS_ENV: comma-separated names, as Kubernetes spells them
 * ("SYS_ADMIN"; "CAP_SYS_ADMIN" and any case too). A name we do not know is
 * logged and skipped, and the others are still dropped: refusing to start
 * would take down an app that runs fine without the drop, which only
 * hardens it; and the injection writes only names listed here. */
static void read_app_drop(void)
{
	const char *list = getenv(DROP_CAPS_ENV);
	char *copy = list ? strdup(list) : NULL;
	char *save = NULL;
	for (char *name = copy ? strtok_r(copy, ",", &save) : NULL; name;
	     name = strtok_r(NULL, ",", &save)) {
		const char *bare = strncasecmp(name, "CAP_", 4) ? name : name + 4;
		int cap = CAP_LAST_CAP;
		while (cap >= 0 && strcasecmp(bare, cap_names[cap]))
			cap--;
		if (cap < 0)
			say("%s: unknown capability %s, not dropped: the app keeps it if the "
			    "container has it", DROP_CAPS_ENV, name);
		else
			app_drop |= 1ULL << cap;
	}
	free(copy);
	unsetenv(DROP_CAPS_ENV); /* the app sees the environment it was given */
}

/* In the app's child, just before its exec: the capabilities CRIU needs but
 * the app would not have had leave every set. The bounding set first (that
 * needs CAP_SETPCAP, which may be among those going), then the rest with one
 * capset. If the kernel refuses, the app starts anyway, with them, and the
 * log says so: we never keep an app from running. */
static void drop_app_caps(void)
{
	if (!app_drop)
		return;
	int failed = 0;
	for (int cap = 0; cap <= CAP_LAST_CAP; cap++) {
		if (!(app_drop >> cap & 1))
			continue;
		/* EINVAL: a capability this kernel does not have, nothing to drop */
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
			failed = errno;
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, cap, 0, 0) < 0 && errno != EINVAL)
			failed = errno;
	}
	struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
	if (syscall(SYS_capget, &head, data) < 0) {
		failed = errno;
	} else {
		for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++) {
			__u32 keep = ~(__u32)(app_drop >> (32 * i));
			data[i].effective &= keep;
			data[i].permitted &= keep;
			data[i].inheritable &= keep;
		}
		if (syscall(SYS_capset, &head, data) < 0)
			failed = errno;
	}
	if (failed)
		say("cannot drop %s from the app: %s; it starts with them", DROP_CAPS_ENV,
		    strerror(failed));
}

/* Fork a child with the default signal state that runs argv; each fds[i]
 * becomes number targets[i] in it. Every fd of ours is close-on-exec. The
 * app (is_app) gets its own session, its output FIFOs and fewer
 * capabilities; anything else (CRIU) the container's capabilities. */
static pid_t run(char **argv, const int *fds, const int *targets, int nfds, int is_app)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	sigprocmask(SIG_UNBLOCK, &handled, NULL);
	if (is_app) {
		setsid(); /* the app leads its own session: CRIU dumps a clean tree */
		for (int i = 0; i < 2; i++) {
			int fd = out_path[i][0] ? open(out_path[i], O_WRONLY) : -1;
			if (fd >= 0 && fd != 1 + i) {
				dup2(fd, 1 + i);
				close(fd);
			}
		}
		drop_app_caps();
	} else {
		/* CRIU: the container's log is for the app (it gets it passed). */
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);
		for (int fd = 0; fd < 3 && null >= 0; fd++)
			dup2(null, fd);
	}
	int moved[MAX_FDS];
	for (int i = 0; i < nfds; i++) /* out of the way of every target first */
		moved[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 1024);
	for (int i = 0; i < nfds; i++)
		if (moved[i] < 0 || dup2(moved[i], targets[i]) < 0)
			_exit(127);
	execvp(argv[0], argv);
	say("cannot run %s: %s", argv[0], strerror(errno));
	_exit(127);
}

static void reply(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (sidecar >= 0 && send(sidecar, buf, n, MSG_NOSIGNAL) < 0) {
		close(sidecar); /* it went away; a new one can connect */
		sidecar = -1;
	}
}

/* Make NAME.out and NAME.err; without them the app gets our stdio directly. */
static void make_outputs(const char *dir, const char *name)
{
	static const char *suffix[2] = {"out", "err"};
	for (int i = 0; i < 2; i++) {
		snprintf(out_path[i], sizeof out_path[i], "%s/%s.%s", dir, name, suffix[i]);
		unlink(out_path[i]);
		if (mkfifo(out_path[i], 0600) < 0) {
			say("no %s (%s): the app's output will not survive a restore",
			    out_path[i], strerror(errno));
			out_path[i][0] = '\0';
			continue;
		}
		out_read[i] = open(out_path[i], O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		/* A writer of our own: the reader never sees EOF while the app is
		 * checkpointed, and the app's open for writing never blocks. */
		open(out_path[i], O_WRONLY | O_CLOEXEC);
	}
}

static ssize_t relay(int from, int to)
{
	char buf[65536];
	ssize_t n = read(from, buf, sizeof buf);
	for (ssize_t done = 0, w; done < n; done += w)
		if ((w = write(to, buf + done, n - done)) <= 0)
			return -1; /* the log is gone: nothing to tell it */
	return n;
}

/* What the app wrote last reaches the log before we end. */
static void finish(int code)
{
	for (int k = 0; k < 2; k++)
		while (out_read[k] >= 0 && relay(out_read[k], 1 + k) > 0)
			;
	exit(code);
}

static void start_app(void)
{
	app_pid = run(app_argv, NULL, NULL, 0, 1);
	if (app_pid < 0) {
		say("cannot fork the app: %s", strerror(errno));
		app_pid = 0;
	}
}

/* Children that ended and were not the app (CRIU, orphans, or a restored app
 * not adopted yet): the last few, for `adopt`. */
#define ENDED 16
static struct {
	pid_t pid;
	int status;
} ended[ENDED];
static int ended_next;

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (pid != app_pid) {
			ended[ended_next].pid = pid;
			ended[ended_next].status = status;
			ended_next = (ended_next + 1) % ENDED;
			continue;
		}
		app_pid = 0;
		if (!managed || stopping)
			finish(exit_code(status));
		reply("exited %d %d", pid, status);
	}
}

static void on_signal(int sig)
{
	if (sig == SIGCHLD) {
		reap();
		return;
	}
	if (sig == SIGTERM || sig == SIGINT)
		stopping = 1;
	if (app_pid > 0)
		kill(app_pid, sig);
	else if (stopping)
		finish(0); /* scaled down, or never started: nothing to wait for */
}

static void on_request(void)
{
	char buf[MAX_MESSAGE + 1];
	char control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
	struct iovec iov = {buf, MAX_MESSAGE};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = control, .msg_controllen = sizeof control};
	ssize_t n = recvmsg(sidecar, &msg, MSG_CMSG_CLOEXEC);
	if (n <= 0) {
		close(sidecar);
		sidecar = -1;
		return;
	}
	buf[n] = '\0';
	int fds[MAX_FDS], nfds = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++)
				if (nfds < MAX_FDS)
					memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	char *args[MAX_ARGS + 1];
	int nargs = 0;
	for (char *p = buf; p < buf + n && nargs < MAX_ARGS; p += strlen(p) + 1)
		args[nargs++] = p;
	args[nargs] = NULL;

	if (nargs == 0) {
		reply("error empty request");
	} else if (!strcmp(args[0], "manage")) {
		managed = 1;
		reply("app %d", app_pid);
	} else if (!strcmp(args[0], "release")) {
		managed = 0;
		reply("released");
		if (app_pid == 0 && !stopping)
			start_app(); /* unmanaged means plainly running */
	} else if (!strcmp(args[0], "start")) {
		if (app_pid == 0)
			start_app();
		reply("app %d", app_pid);
	} else if (!strcmp(args[0], "exec") && nargs > 2) {
		int targets[MAX_FDS], ntargets = 0;
		for (char *t = strtok(args[1], ","); t && ntargets < MAX_FDS; t = strtok(NULL, ","))
			targets[ntargets++] = atoi(t);
		pid_t pid = ntargets == nfds ? run(args + 2, fds, targets, nfds, 0) : -1;
		reply("exec %d", pid < 0 ? 0 : pid);
	} else if (!strcmp(args[0], "adopt") && nargs > 1) {
		app_pid = atoi(args[1]);
		reply("app %d", app_pid);
		for (int k = 0; k < ENDED; k++)
			if (app_pid > 0 && ended[k].pid == app_pid) {
				ended[k].pid = 0;
				app_pid = 0;
				reply("exited %d %d", atoi(args[1]), ended[k].status);
			}
	} else if (!strcmp(args[0], "exit") && nargs > 1) {
		finish(atoi(args[1]));
	} else {
		reply("error unknown request %s", args[0]);
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
}

static int listen_on(const char *dir, const char *name)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	mkdir(dir, 0700);
	if ((size_t)snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s.sock", dir, name) >=
	    sizeof addr.sun_path) {
		say("control path %s/%s.sock is too long", dir, name);
		return -1;
	}
	unlink(addr.sun_path); /* left by an earlier run of this container */
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0) {
		say("cannot listen on %s: %s", addr.sun_path, strerror(errno));
		return -1;
	}
	chmod(addr.sun_path, 0600);
	return fd;
}

static void usage(void)
{
	fprintf(stderr, "usage: holder --name NAME [--control DIR] -- CMD [ARG...]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *name = NULL, *dir = "/pod-activator/run";
	int i = 1;
	for (; i < argc && strcmp(argv[i], "--"); i++) {
		if (!strcmp(argv[i], "--name") && i + 1 < argc)
			name = argv[++i];
		else if (!strcmp(argv[i], "--control") && i + 1 < argc)
			dir = argv[++i];
		else
			usage();
	}
	if (!name || i + 1 >= argc || strchr(name, '/'))
		usage();
	app_argv = argv + i + 1;
	read_app_drop();

	/* Orphans of the app, and the app CRIU restores, come to us to reap. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	sigemptyset(&handled);
	int forwarded[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
	for (size_t k = 0; k < sizeof forwarded / sizeof *forwarded; k++)
		sigaddset(&handled, forwarded[k]);
	sigprocmask(SIG_BLOCK, &handled, NULL);
	int signals = signalfd(-1, &handled, SFD_CLOEXEC);
	/* Without a control socket the app still runs, unmanaged, as it would
	 * without us: a broken sidecar never takes the app down. */
	int listener = listen_on(dir, name);
	make_outputs(dir, name);
	start_app();
	if (app_pid == 0)
		return 127;

	for (;;) {
		struct pollfd fds[5] = {{signals, POLLIN, 0}, {listener, POLLIN, 0},
					{sidecar, POLLIN, 0}, {out_read[0], POLLIN, 0},
					{out_read[1], POLLIN, 0}};
		if (poll(fds, 5, -1) < 0 && errno != EINTR)
			return 1;
		for (int k = 0; k < 2; k++)
			if (fds[3 + k].revents & POLLIN)
				relay(out_read[k], 1 + k);
		if (fds[0].revents & POLLIN) {
			struct signalfd_siginfo info;
			if (read(signals, &info, sizeof info) == sizeof info)
				on_signal((int)info.ssi_signo);
		}
		if (fds[1].revents & POLLIN) {
			int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
			if (fd >= 0) {
				if (sidecar >= 0)
					close(sidecar); /* the newest sidecar wins */
				sidecar = fd;
			}
		}
		if (sidecar >= 0 && (fds[2].revents & (POLLIN | POLLHUP | POLLERR)))
			on_request();
	}
}
