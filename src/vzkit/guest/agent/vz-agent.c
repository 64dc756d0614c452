/*
 * vz-agent: the vzkit guest agent.
 *
 * Runs inside every guest (as PID 1 in the minimal initramfs image, as a service in
 * disk images) and serves the vzkit wire protocol (PROTOCOL.md, version 1) over one
 * virtio-serial port: command execution, file transfer, power-off and file system
 * freeze (quiescing the disks for a snapshot).
 *
 * One process, one thread, one poll() loop: every child pipe is non-blocking so a
 * slow consumer of one stream never stalls the others. Writes to the port may block
 * (the host is then not reading); that is the flow control towards the host.
 *
 * Built static (musl-gcc -static -O2 -s) by vzkit.guest.build.agent_binary.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "1.1.0"
#define PROTO_VERSION 1
/* HELLO feature bits (PROTOCOL.md): what this agent understands beyond revision 1. */
#define FEATURE_FSFREEZE 0x1u
#define MAGIC 0x565A
#define HDR 12
#define MAX_PAYLOAD (1u << 20)
#define CHUNK 65536
/* Above this much unwritten stdin for one session we stop reading the port, so a
 * child that does not read its stdin cannot make the agent buffer without limit. */
#define STDIN_HIGH_WATER (4u << 20)
#define DRAIN_MS 200
#define RECONNECT_POLL_MS 20
#define PORT_WAIT_MS 10000

enum {
    T_HELLO = 0x01,
    T_EXEC = 0x10,
    T_STARTED = 0x11,
    T_STDIN = 0x12,
    T_STDOUT = 0x13,
    T_STDERR = 0x14,
    T_EXIT = 0x15,
    T_SIGNAL = 0x16,
    T_RESIZE = 0x17,
    T_ERROR = 0x1F,
    T_FILE_PUT = 0x20,
    T_FILE_GET = 0x21,
    T_DATA = 0x22,
    T_OK = 0x24,
    T_POWEROFF = 0x30,
    T_FSFREEZE = 0x40,
    T_FSTHAW = 0x41,
};

#define EXEC_TTY 0x1u
#define EXEC_STDIN 0x2u
#define PUT_PARENTS 0x1u

static const char DEFAULT_PATH[] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/* ------------------------------------------------------------------------------ */
/* State                                                                            */

struct exec_s {
    struct exec_s *next;
    uint32_t id;
    pid_t pid;
    int tty;
    int in_fd;  /* pipe to the child's stdin, or a dup of the pty master */
    int out_fd; /* stdout pipe, or the pty master */
    int err_fd; /* stderr pipe; -1 in tty mode */
    uint8_t *inbuf;
    size_t inlen, inoff, incap;
    int in_eof;
    int exited;
    int status;
    int timed_out;
    int64_t deadline;       /* 0 = no timeout */
    int64_t drain_deadline; /* set once reaped while output is still open */
};

struct put_s {
    struct put_s *next;
    uint32_t id;
    int fd;     /* -1 once failed: the remaining DATA frames are swallowed */
    int failed;
    mode_t mode;
    char *path;
    char *tmp;
};

struct get_s {
    struct get_s *next;
    uint32_t id;
    int fd;
    int done;
};

static int port_fd = -1;
static int connected;
static int lost; /* a write failed: tear down at the top of the loop, not mid-iteration */
static int is_pid1;
static int no_poweroff;
static int log_fd = 2;
static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t got_term;

static uint8_t *rbuf;
static size_t rlen;
static size_t rcap;
static int resyncing;
static uint8_t *obuf; /* scratch for outgoing payloads read from children/files */

static struct exec_s *execs;
static struct put_s *puts_;
static struct get_s *gets;

/* File systems this agent froze (FSFREEZE), in freeze order. */
struct frozen_fs {
    int fd;
    char *path;
};
static struct frozen_fs *frozen; /* in freeze order */
static size_t nfrozen;
static int64_t freeze_deadline; /* 0 = nothing frozen */

/* ------------------------------------------------------------------------------ */
/* Utilities                                                                        */

static void logmsg(const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "vz-agent: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(log_fd, buf, (size_t)n);
    (void)w;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Allocation failure must not kill PID 1 (that panics the guest): wait and retry. */
static void *xrealloc(void *p, size_t n)
{
    for (;;) {
        void *q = realloc(p, n ? n : 1);
        if (q)
            return q;
        logmsg("out of memory (%zu bytes), retrying", n);
        sleep_ms(100);
    }
}

static char *xstrndup(const uint8_t *s, size_t n)
{
    char *r = xrealloc(NULL, n + 1);
    memcpy(r, s, n);
    r[n] = 0;
    return r;
}

static char *xstrdup(const char *s)
{
    return xstrndup((const uint8_t *)s, strlen(s));
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void set_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFD);
    if (fl >= 0)
        fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Payload builder. */
struct pbuf {
    uint8_t *p;
    size_t len, cap;
};

static void pb_need(struct pbuf *b, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
}
static void pb_u16(struct pbuf *b, uint16_t v)
{
    pb_need(b, 2);
    put16(b->p + b->len, v);
    b->len += 2;
}
static void pb_u32(struct pbuf *b, uint32_t v)
{
    pb_need(b, 4);
    put32(b->p + b->len, v);
    b->len += 4;
}
static void pb_str(struct pbuf *b, const char *s, size_t n)
{
    pb_u32(b, (uint32_t)n);
    pb_need(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

/* Payload reader: any overrun sets bad, and every later read yields zeros. */
struct rd {
    const uint8_t *p;
    size_t len, off;
    int bad;
};

static int rd_has(struct rd *r, size_t n)
{
    if (r->bad || r->len - r->off < n) {
        r->bad = 1;
        return 0;
    }
    return 1;
}
static uint8_t rd_u8(struct rd *r)
{
    if (!rd_has(r, 1))
        return 0;
    return r->p[r->off++];
}
static uint16_t rd_u16(struct rd *r)
{
    if (!rd_has(r, 2))
        return 0;
    uint16_t v = be16(r->p + r->off);
    r->off += 2;
    return v;
}
static uint32_t rd_u32(struct rd *r)
{
    if (!rd_has(r, 4))
        return 0;
    uint32_t v = be32(r->p + r->off);
    r->off += 4;
    return v;
}
/* Returns a NUL-terminated copy; a string with an embedded NUL cannot be a path,
 * argument or variable, so it makes the payload malformed. */
static char *rd_cstr(struct rd *r)
{
    uint32_t n = rd_u32(r);
    if (!rd_has(r, n))
        return NULL;
    const uint8_t *s = r->p + r->off;
    r->off += n;
    if (memchr(s, 0, n)) {
        r->bad = 1;
        return NULL;
    }
    return xstrndup(s, n);
}
static char **rd_strlist(struct rd *r, size_t *count)
{
    uint32_t n = rd_u32(r);
    /* Each entry takes at least 4 bytes: reject absurd counts before allocating. */
    if (r->bad || n > (r->len - r->off) / 4) {
        r->bad = 1;
        return NULL;
    }
    char **v = xrealloc(NULL, ((size_t)n + 1) * sizeof *v);
    size_t i;
    for (i = 0; i < n; i++) {
        v[i] = rd_cstr(r);
        if (!v[i])
            break;
    }
    v[i] = NULL;
    *count = i;
    return v;
}
static void free_strlist(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

/* ------------------------------------------------------------------------------ */
/* Sending                                                                          */

/* Waits for the port to take more bytes. Returns -1 if the host went away. */
static int wait_port_writable(void)
{
    for (;;) {
        struct pollfd p = {port_fd, POLLOUT, 0};
        int r = poll(&p, 1, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (p.revents & POLLOUT)
            return 0;
        if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
            return -1;
    }
}

static void send_frame(uint8_t type, uint32_t stream, const void *payload, size_t len)
{
    if (!connected || lost)
        return;
    uint8_t hdr[HDR];
    put16(hdr, MAGIC);
    hdr[2] = PROTO_VERSION;
    hdr[3] = type;
    put32(hdr + 4, stream);
    put32(hdr + 8, (uint32_t)len);
    struct iovec iov[2] = {{hdr, HDR}, {(void *)payload, len}};
    int iovcnt = len ? 2 : 1;
    struct iovec *v = iov;
    while (iovcnt > 0) {
        ssize_t n = writev(port_fd, v, iovcnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN && wait_port_writable() == 0)
                continue;
            lost = 1;
            return;
        }
        while (iovcnt > 0 && (size_t)n >= v->iov_len) {
            n -= (ssize_t)v->iov_len;
            v++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            v->iov_base = (uint8_t *)v->iov_base + n;
            v->iov_len -= (size_t)n;
        }
    }
}

static void send_error(uint32_t stream, int err, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n >= (int)sizeof msg)
        n = (int)sizeof msg - 1;
    uint8_t pay[4 + 4 + sizeof msg];
    put32(pay, (uint32_t)err);
    put32(pay + 4, (uint32_t)n);
    memcpy(pay + 8, msg, (size_t)n);
    send_frame(T_ERROR, stream, pay, 8 + (size_t)n);
}

static void send_hello(void)
{
    struct utsname u;
    const char *rel = uname(&u) == 0 ? u.release : "";
    struct pbuf b = {0};
    pb_u16(&b, PROTO_VERSION);
    pb_str(&b, AGENT_VERSION, strlen(AGENT_VERSION));
    pb_str(&b, rel, strlen(rel));
    pb_u32(&b, FEATURE_FSFREEZE);
    send_frame(T_HELLO, 0, b.p, b.len);
    free(b.p);
}

/* ------------------------------------------------------------------------------ */
/* Sessions                                                                         */

static struct exec_s *find_exec(uint32_t id)
{
    for (struct exec_s *e = execs; e; e = e->next)
        if (e->id == id)
            return e;
    return NULL;
}
static struct put_s *find_put(uint32_t id)
{
    for (struct put_s *p = puts_; p; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}
static struct get_s *find_get(uint32_t id)
{
    for (struct get_s *g = gets; g; g = g->next)
        if (g->id == id)
            return g;
    return NULL;
}
static int stream_in_use(uint32_t id)
{
    return find_exec(id) || find_put(id) || find_get(id);
}

static void exec_close_fds(struct exec_s *e)
{
    close_fd(&e->in_fd);
    close_fd(&e->out_fd);
    close_fd(&e->err_fd);
}

static void free_exec(struct exec_s *e)
{
    exec_close_fds(e);
    free(e->inbuf);
    free(e);
}

static void put_abort(struct put_s *p)
{
    close_fd(&p->fd);
    if (p->tmp)
        unlink(p->tmp);
    free(p->tmp);
    p->tmp = NULL;
}

static void free_put(struct put_s *p)
{
    put_abort(p);
    free(p->path);
    free(p);
}

/* Kills every session and forgets every stream: used when the host goes away and
 * before the agent exits. Children are reaped later by the waitpid(-1) loop. */
static void drop_all_sessions(void)
{
    while (execs) {
        struct exec_s *e = execs;
        execs = e->next;
        if (!e->exited || e->out_fd >= 0 || e->err_fd >= 0)
            kill(-e->pid, SIGKILL);
        free_exec(e);
    }
    while (puts_) {
        struct put_s *p = puts_;
        puts_ = p->next;
        free_put(p);
    }
    while (gets) {
        struct get_s *g = gets;
        gets = g->next;
        close_fd(&g->fd);
        free(g);
    }
    rlen = 0;
    resyncing = 0;
}

/* ------------------------------------------------------------------------------ */
/* EXEC                                                                             */

enum { STAGE_TTY = 1, STAGE_STDIO, STAGE_CHDIR, STAGE_EXEC };

struct child_report {
    int err;
    int stage;
};

static const char *env_path(char **envp)
{
    for (char **e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0)
            return *e + 5;
    return DEFAULT_PATH;
}

/* execvpe() semantics, with PATH taken from the command's environment rather than
 * the agent's. Returns the errno to report. */
static int exec_search(char **argv, char **envp)
{
    const char *file = argv[0];
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return errno;
    }
    const char *path = env_path(envp);
    size_t flen = strlen(file);
    int saw_eacces = 0;
    char buf[4096];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        size_t dlen = (size_t)(end - p);
        if (dlen + 1 + flen + 1 <= sizeof buf) {
            if (dlen == 0) {
                memcpy(buf, file, flen + 1);
            } else {
                memcpy(buf, p, dlen);
                buf[dlen] = '/';
                memcpy(buf + dlen + 1, file, flen + 1);
            }
            execve(buf, argv, envp);
            switch (errno) {
            case EACCES:
                saw_eacces = 1;
                break;
            case ENOENT:
            case ENOTDIR:
            case ENAMETOOLONG:
            case ELOOP:
            case ENODEV:
            case ETIMEDOUT:
            case ESTALE:
                break;
            default:
                return errno;
            }
        }
        if (!*end)
            break;
        p = end;
    }
    return saw_eacces ? EACCES : ENOENT;
}

static void __attribute__((noreturn)) child_fail(int rep_fd, int stage)
{
    struct child_report r = {errno, stage};
    ssize_t w = write(rep_fd, &r, sizeof r);
    (void)w;
    _exit(127);
}

static void __attribute__((noreturn))
child_main(char **argv, char **envp, const char *cwd, int tty, const char *slave,
                       int in_fd, int out_fd, int err_fd, int rep_fd)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* An ignored disposition survives exec (handlers do not); SIGPIPE is the only one
     * the agent ignores, the rest were reset at start-up. */
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (tty) {
        int fd = open(slave, O_RDWR);
        if (fd < 0)
            child_fail(rep_fd, STAGE_TTY);
        if (ioctl(fd, TIOCSCTTY, 0) < 0)
            child_fail(rep_fd, STAGE_TTY);
        in_fd = out_fd = err_fd = fd;
    } else if (in_fd < 0) {
        in_fd = open("/dev/null", O_RDONLY);
        if (in_fd < 0)
            child_fail(rep_fd, STAGE_STDIO);
    }
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
        child_fail(rep_fd, STAGE_STDIO);
    if (in_fd > 2)
        close(in_fd);
    if (out_fd > 2 && out_fd != in_fd)
        close(out_fd);
    if (err_fd > 2 && err_fd != in_fd && err_fd != out_fd)
        close(err_fd);
    if (chdir(cwd) < 0)
        child_fail(rep_fd, STAGE_CHDIR);
    errno = exec_search(argv, envp);
    child_fail(rep_fd, STAGE_EXEC);
}

/* vfork, not fork: copying the agent's page tables is a measurable part of an exec
 * under TCG. The child only makes system calls until execve or _exit (child_main).
 * A function of its own so no local of handle_exec lives across the vfork. */
static pid_t __attribute__((noinline))
spawn_child(char **argv, char **envp, const char *cwd, int tty, const char *slave, int in_fd,
            int out_fd, int err_fd, int rep_rd, int rep_wr)
{
    pid_t pid = vfork();
    if (pid == 0) {
        close(rep_rd);
        child_main(argv, envp, cwd, tty, slave, in_fd, out_fd, err_fd, rep_wr);
    }
    return pid;
}

static int open_pty(int *master, char *slave, size_t slave_len, uint16_t rows, uint16_t cols)
{
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0 && (errno == ENOENT || errno == ENODEV || errno == EIO) && geteuid() == 0) {
        /* The minimal image's /init mounts devtmpfs only; devpts is mounted here on
         * first use so boot (and the HELLO) is not delayed by it. */
        mkdir("/dev/pts", 0755);
        if (mount("devpts", "/dev/pts", "devpts", 0, "gid=5,mode=620,ptmxmode=666") == 0) {
            if (access("/dev/ptmx", F_OK) != 0)
                symlink("pts/ptmx", "/dev/ptmx");
        }
        m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    }
    if (m < 0)
        return -1;
    if (grantpt(m) < 0 || unlockpt(m) < 0 || ptsname_r(m, slave, slave_len) != 0) {
        int err = errno;
        close(m);
        errno = err;
        return -1;
    }
    struct winsize ws = {rows ? rows : 24, cols ? cols : 80, 0, 0};
    ioctl(m, TIOCSWINSZ, &ws);
    *master = m;
    return 0;
}

static void handle_exec(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    uint32_t flags = rd_u32(&r);
    uint32_t timeout_ms = rd_u32(&r);
    uint16_t rows = rd_u16(&r);
    uint16_t cols = rd_u16(&r);
    size_t argc = 0, envc = 0;
    char **argv = rd_strlist(&r, &argc);
    char **envp = r.bad ? NULL : rd_strlist(&r, &envc);
    char *cwd = r.bad ? NULL : rd_cstr(&r);
    int tty = (flags & EXEC_TTY) != 0;
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, rep[2] = {-1, -1};
    int master = -1;
    char slave[64] = "";

    if (r.bad || r.off != len) {
        send_error(id, EINVAL, "malformed EXEC payload");
        goto out;
    }
    if (id == 0 || stream_in_use(id)) {
        send_error(id, EEXIST, "stream %u is 0 or already in use", id);
        goto out;
    }
    if (argc == 0 || argv[0][0] == 0) {
        send_error(id, EINVAL, "EXEC needs a non-empty argv");
        goto out;
    }
    if (envc == 0) {
        free(envp);
        envp = xrealloc(NULL, 4 * sizeof *envp);
        envp[0] = xrealloc(NULL, 5 + sizeof DEFAULT_PATH);
        memcpy(envp[0], "PATH=", 5);
        memcpy(envp[0] + 5, DEFAULT_PATH, sizeof DEFAULT_PATH);
        envp[1] = xstrdup("HOME=/root");
        envp[2] = xstrdup(tty ? "TERM=xterm" : "TERM=linux");
        envp[3] = NULL;
    }
    const char *dir = (cwd && *cwd) ? cwd : "/";

    if (tty) {
        if (open_pty(&master, slave, sizeof slave, rows, cols) < 0) {
            send_error(id, errno, "cannot allocate a pseudo-terminal: %s", strerror(errno));
            goto out;
        }
    } else {
        if (((flags & EXEC_STDIN) && pipe2(pin, O_CLOEXEC) < 0) || pipe2(pout, O_CLOEXEC) < 0 ||
            pipe2(perr, O_CLOEXEC) < 0) {
            send_error(id, errno, "cannot create pipes: %s", strerror(errno));
            goto out;
        }
    }
    if (pipe2(rep, O_CLOEXEC) < 0) {
        send_error(id, errno, "cannot create a pipe: %s", strerror(errno));
        goto out;
    }

    pid_t pid = spawn_child(argv, envp, dir, tty, slave, pin[0], pout[1], perr[1], rep[0], rep[1]);
    if (pid < 0) {
        send_error(id, errno, "fork: %s", strerror(errno));
        goto out;
    }
    close_fd(&rep[1]);
    close_fd(&pin[0]);
    close_fd(&pout[1]);
    close_fd(&perr[1]);

    /* The report pipe is close-on-exec: EOF means the command is running. */
    struct child_report rpt;
    ssize_t n;
    do
        n = read(rep[0], &rpt, sizeof rpt);
    while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof rpt) {
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
            ;
        switch (rpt.stage) {
        case STAGE_CHDIR:
            send_error(id, rpt.err, "cannot change directory to %s: %s", dir, strerror(rpt.err));
            break;
        case STAGE_EXEC:
            send_error(id, rpt.err, "cannot execute %s: %s", argv[0], strerror(rpt.err));
            break;
        case STAGE_TTY:
            send_error(id, rpt.err, "cannot open terminal %s: %s", slave, strerror(rpt.err));
            break;
        default:
            send_error(id, rpt.err, "cannot set up stdio: %s", strerror(rpt.err));
            break;
        }
        goto out;
    }

    struct exec_s *e = xrealloc(NULL, sizeof *e);
    memset(e, 0, sizeof *e);
    e->id = id;
    e->pid = pid;
    e->tty = tty;
    e->err_fd = -1;
    if (tty) {
        e->out_fd = master;
        e->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
        master = -1;
        set_nonblock(e->out_fd);
    } else {
        e->in_fd = pin[1];
        e->out_fd = pout[0];
        e->err_fd = perr[0];
        pin[1] = pout[0] = perr[0] = -1;
        set_nonblock(e->out_fd);
        set_nonblock(e->err_fd);
    }
    if (e->in_fd >= 0)
        set_nonblock(e->in_fd);
    e->deadline = timeout_ms ? now_ms() + timeout_ms : 0;
    e->next = execs;
    execs = e;

    uint8_t pay[4];
    put32(pay, (uint32_t)pid);
    send_frame(T_STARTED, id, pay, 4);

out:
    close_fd(&rep[0]);
    close_fd(&rep[1]);
    close_fd(&master);
    for (int i = 0; i < 2; i++) {
        close_fd(&pin[i]);
        close_fd(&pout[i]);
        close_fd(&perr[i]);
    }
    free_strlist(argv);
    free_strlist(envp);
    free(cwd);
}

static void flush_stdin(struct exec_s *e)
{
    while (e->in_fd >= 0 && e->inoff < e->inlen) {
        ssize_t n = write(e->in_fd, e->inbuf + e->inoff, e->inlen - e->inoff);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            /* The child closed its stdin (EPIPE): what it did not read is dropped. */
            close_fd(&e->in_fd);
            break;
        }
        e->inoff += (size_t)n;
    }
    e->inoff = e->inlen = 0;
    if (e->in_eof && !e->tty)
        close_fd(&e->in_fd);
}

static void handle_stdin(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct exec_s *e = find_exec(id);
    if (!e) {
        send_error(id, ENOENT, "STDIN for unknown stream %u", id);
        return;
    }
    if (e->in_fd < 0)
        return;
    if (len == 0) {
        /* A pty has no EOF of its own; the host sends ^D itself if it wants one. */
        if (!e->tty) {
            e->in_eof = 1;
            if (e->inoff == e->inlen)
                close_fd(&e->in_fd);
        }
        return;
    }
    if (e->inoff > 0 && e->inoff == e->inlen)
        e->inoff = e->inlen = 0;
    if (e->inlen + len > e->incap) {
        if (e->inoff > 0) {
            memmove(e->inbuf, e->inbuf + e->inoff, e->inlen - e->inoff);
            e->inlen -= e->inoff;
            e->inoff = 0;
        }
        if (e->inlen + len > e->incap) {
            e->incap = e->inlen + len;
            e->inbuf = xrealloc(e->inbuf, e->incap);
        }
    }
    memcpy(e->inbuf + e->inlen, p, len);
    e->inlen += len;
    flush_stdin(e);
}

static void handle_signal(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    int sig = (int)rd_u32(&r);
    struct exec_s *e = find_exec(id);
    if (r.bad || r.off != len) {
        send_error(id, EINVAL, "malformed SIGNAL payload");
        return;
    }
    if (!e) {
        send_error(id, ENOENT, "SIGNAL for unknown stream %u", id);
        return;
    }
    /* Errors (the group is already gone) are not reported: the EXIT frame says it all. */
    kill(-e->pid, sig);
}

static void handle_resize(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    uint16_t rows = rd_u16(&r);
    uint16_t cols = rd_u16(&r);
    struct exec_s *e = find_exec(id);
    if (r.bad || r.off != len) {
        send_error(id, EINVAL, "malformed RESIZE payload");
        return;
    }
    if (!e) {
        send_error(id, ENOENT, "RESIZE for unknown stream %u", id);
        return;
    }
    if (e->tty && e->in_fd >= 0) {
        /* The kernel sends SIGWINCH to the foreground process group itself. */
        struct winsize ws = {rows, cols, 0, 0};
        ioctl(e->in_fd, TIOCSWINSZ, &ws);
    }
}

static void send_exit(struct exec_s *e)
{
    int code = 0, sig = 0;
    if (WIFEXITED(e->status)) {
        code = WEXITSTATUS(e->status);
    } else if (WIFSIGNALED(e->status)) {
        sig = WTERMSIG(e->status);
        code = 128 + sig;
    }
    uint8_t pay[9];
    put32(pay, (uint32_t)code);
    put32(pay + 4, (uint32_t)sig);
    pay[8] = (uint8_t)(e->timed_out ? 1 : 0);
    send_frame(T_EXIT, e->id, pay, sizeof pay);
}

/* Reads one chunk of child output; closes the fd at EOF. */
static void pump_output(struct exec_s *e, int *fd, uint8_t type)
{
    ssize_t n;
    do
        n = read(*fd, obuf, CHUNK);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        send_frame(type, e->id, obuf, (size_t)n);
        return;
    }
    if (n < 0 && errno == EAGAIN)
        return;
    /* 0 = EOF on a pipe; EIO = every slave fd of the pty is closed. */
    close_fd(fd);
}

/* ------------------------------------------------------------------------------ */
/* Files                                                                            */

static int mkdir_parents(const char *path)
{
    char *dup = strdup(path);
    if (!dup)
        return -1;
    for (char *s = dup + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        if (mkdir(dup, 0755) < 0 && errno != EEXIST) {
            int err = errno;
            free(dup);
            errno = err;
            return -1;
        }
        *s = '/';
    }
    free(dup);
    return 0;
}

static void handle_file_put(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    uint32_t mode = rd_u32(&r);
    uint8_t flags = rd_u8(&r);
    char *path = rd_cstr(&r);
    if (r.bad || r.off != len || !path || !*path) {
        send_error(id, EINVAL, "malformed FILE_PUT payload");
        free(path);
        return;
    }
    if (id == 0 || stream_in_use(id)) {
        send_error(id, EEXIST, "stream %u is 0 or already in use", id);
        free(path);
        return;
    }
    struct put_s *f = xrealloc(NULL, sizeof *f);
    memset(f, 0, sizeof *f);
    f->id = id;
    f->fd = -1;
    f->mode = (mode_t)(mode & 07777);
    f->path = path;
    f->next = puts_;
    puts_ = f;
    if (freeze_deadline) {
        /* Writing now would block this thread on a frozen file system. */
        send_error(id, EBUSY, "cannot write %s: the guest's file systems are frozen for a snapshot",
                   path);
        f->failed = 1;
        return;
    }

    /* Failures are answered now; the DATA frames the host already sent are swallowed. */
    if ((flags & PUT_PARENTS) && mkdir_parents(path) < 0) {
        send_error(id, errno, "cannot create the parent directories of %s: %s", path,
                   strerror(errno));
        f->failed = 1;
        return;
    }
    const char *slash = strrchr(path, '/');
    size_t dlen = slash ? (size_t)(slash - path + 1) : 0;
    const char *base = slash ? slash + 1 : path;
    if (!*base) {
        errno = EISDIR;
        send_error(id, EISDIR, "cannot write %s: %s", path, strerror(EISDIR));
        f->failed = 1;
        return;
    }
    f->tmp = xrealloc(NULL, dlen + strlen(base) + 32);
    sprintf(f->tmp, "%.*s.%s.vztmp.XXXXXX", (int)dlen, path, base);
    f->fd = mkostemp(f->tmp, O_CLOEXEC);
    if (f->fd < 0) {
        send_error(id, errno, "cannot write %s: %s", path, strerror(errno));
        free(f->tmp);
        f->tmp = NULL;
        f->failed = 1;
    }
}

static void handle_data(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct put_s *f = find_put(id);
    if (!f) {
        send_error(id, ENOENT, "DATA for unknown stream %u", id);
        return;
    }
    if (len > 0) {
        if (f->failed)
            return;
        size_t off = 0;
        while (off < len) {
            ssize_t n = write(f->fd, p + off, len - off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                int err = n < 0 ? errno : EIO;
                send_error(id, err, "cannot write %s: %s", f->path, strerror(err));
                put_abort(f);
                f->failed = 1;
                return;
            }
            off += (size_t)n;
        }
        return;
    }
    /* End of the file. */
    if (!f->failed) {
        /* fchmod, not the create mode: the umask must not change what the host asked. */
        int ok = fchmod(f->fd, f->mode) == 0;
        int err = errno;
        int fd = f->fd;
        f->fd = -1;
        if (close(fd) < 0 && ok) {
            ok = 0;
            err = errno;
        }
        if (ok && rename(f->tmp, f->path) < 0) {
            ok = 0;
            err = errno;
        }
        if (!ok) {
            send_error(id, err, "cannot write %s: %s", f->path, strerror(err));
        } else {
            free(f->tmp);
            f->tmp = NULL;
            send_frame(T_OK, id, NULL, 0);
        }
    }
    for (struct put_s **pp = &puts_; *pp; pp = &(*pp)->next) {
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    }
    free_put(f);
}

static void handle_file_get(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    char *path = rd_cstr(&r);
    if (r.bad || r.off != len || !path) {
        send_error(id, EINVAL, "malformed FILE_GET payload");
        free(path);
        return;
    }
    if (id == 0 || stream_in_use(id)) {
        send_error(id, EEXIST, "stream %u is 0 or already in use", id);
        free(path);
        return;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        send_error(id, errno, "cannot read %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        free(path);
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        send_error(id, EISDIR, "cannot read %s: %s", path, strerror(EISDIR));
        close(fd);
        free(path);
        return;
    }
    free(path);
    uint8_t pay[12];
    uint64_t size = S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0;
    put32(pay, (uint32_t)(st.st_mode & 07777));
    put32(pay + 4, (uint32_t)(size >> 32));
    put32(pay + 8, (uint32_t)size);
    send_frame(T_OK, id, pay, sizeof pay);
    struct get_s *g = xrealloc(NULL, sizeof *g);
    g->id = id;
    g->fd = fd;
    g->done = 0;
    g->next = gets;
    gets = g;
}

/* Sends a few chunks of each pending FILE_GET per loop turn, so a big file does not
 * hold up the other streams. */
static void pump_gets(void)
{
    for (struct get_s *g = gets; g; g = g->next) {
        for (int i = 0; i < 4 && !g->done; i++) {
            ssize_t n = read(g->fd, obuf, CHUNK);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                send_error(g->id, errno, "read error: %s", strerror(errno));
                g->done = 1;
            } else {
                send_frame(T_DATA, g->id, obuf, (size_t)n);
                if (n == 0)
                    g->done = 1;
            }
        }
    }
    for (struct get_s **pp = &gets; *pp;) {
        struct get_s *g = *pp;
        if (g->done) {
            *pp = g->next;
            close_fd(&g->fd);
            free(g);
        } else {
            pp = &g->next;
        }
    }
}

/* ------------------------------------------------------------------------------ */
/* File system freeze                                                               */
/*
 * FSFREEZE quiesces the guest's disks for a snapshot: sync(), then FIFREEZE on every
 * writable, block-backed file system, the last mounted first (one mounted inside
 * another is frozen before its parent). What has no block device behind it (tmpfs,
 * proc, sysfs, devtmpfs, the initramfs root) is skipped, and so is what refuses
 * (EOPNOTSUPP: no freeze support; EBUSY: frozen by someone else, who thaws it). A
 * freeze belongs to the connection that asked for it: FSTHAW, the host going away,
 * POWEROFF or the freeze's own deadline thaws it, so a guest whose host died never
 * stays frozen (as qemu-guest-agent's fsfreeze timeout).
 *
 * While frozen the agent must never write to a frozen file system itself: the write
 * would block this single thread for good, and nothing could thaw. FILE_PUT is
 * refused until the thaw; commands may run (their writes wait for the thaw).
 */
#ifndef FIFREEZE
#define FIFREEZE _IOWR('X', 119, int)
#define FITHAW _IOWR('X', 120, int)
#endif
#define FREEZE_DEFAULT_MS 60000u
#define FREEZE_MAX_MS 600000u

/* Thaws in the reverse order of the freeze; returns how many were thawed. */
static uint32_t thaw_all(const char *why)
{
    uint32_t n = 0;
    while (nfrozen > 0) {
        struct frozen_fs *f = &frozen[--nfrozen];
        if (ioctl(f->fd, FITHAW, 0) == 0)
            n++;
        else
            logmsg("thawing %s: %s", f->path, strerror(errno));
        close(f->fd);
        free(f->path);
    }
    freeze_deadline = 0;
    if (why && n)
        logmsg("thawed %u file system(s): %s", n, why);
    return n;
}

/* mountinfo escapes space, tab, newline and backslash as \ooo. */
static void unescape_octal(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' &&
            r[3] >= '0' && r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 3;
        } else {
            *w++ = *r;
        }
    }
    *w = 0;
}

static int has_option(const char *opts, const char *name)
{
    size_t n = strlen(name);
    for (const char *o = opts; o; o = strchr(o, ',')) {
        if (*o == ',')
            o++;
        if (strncmp(o, name, n) == 0 && (o[n] == ',' || o[n] == 0))
            return 1;
    }
    return 0;
}

struct mount_ent {
    char *path;
    unsigned maj, min;
};

/* One /proc/self/mountinfo line: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...]
 * - FSTYPE SOURCE SUPEROPTIONS". Returns 1 for a writable, block-backed mount. */
static int parse_mount(char *line, struct mount_ent *m)
{
    char *sep = strstr(line, " - ");
    if (!sep)
        return 0;
    *sep = 0;
    char *f[6];
    char *save = NULL;
    char *tok = strtok_r(line, " ", &save);
    for (int i = 0; i < 6; i++, tok = strtok_r(NULL, " ", &save)) {
        if (!tok)
            return 0;
        f[i] = tok;
    }
    save = NULL;
    char *fstype = strtok_r(sep + 3, " ", &save);
    char *source = strtok_r(NULL, " ", &save);
    char *superopts = strtok_r(NULL, " \n", &save);
    if (!fstype || !source || !superopts)
        return 0;
    if (sscanf(f[2], "%u:%u", &m->maj, &m->min) != 2)
        return 0;
    if (has_option(f[5], "ro") || has_option(superopts, "ro"))
        return 0;
    unescape_octal(f[4]);
    unescape_octal(source);
    /* Block-backed: a real device number, or (btrfs, whose mounts carry anonymous
     * numbers) a block device as the source. */
    int block = m->maj != 0;
    struct stat st;
    if (!block && source[0] == '/' && stat(source, &st) == 0 && S_ISBLK(st.st_mode))
        block = 1;
    if (!block)
        return 0;
    m->path = xstrdup(f[4]);
    return 1;
}

/* The writable, block-backed mounts in mount order. 0, or an errno. */
static int writable_block_mounts(struct mount_ent **out, size_t *count)
{
    *out = NULL;
    *count = 0;
    FILE *mi = fopen("/proc/self/mountinfo", "re");
    if (!mi)
        return errno;
    size_t cap = 0;
    char *line = NULL;
    size_t linecap = 0;
    while (getline(&line, &linecap, mi) > 0) {
        struct mount_ent m;
        if (!parse_mount(line, &m))
            continue;
        if (*count == cap) {
            cap = cap ? cap * 2 : 16;
            *out = xrealloc(*out, cap * sizeof **out);
        }
        (*out)[(*count)++] = m;
    }
    free(line);
    fclose(mi);
    return 0;
}

/* Freezes what writable_block_mounts found, last first. 0, or an errno (all thawed). */
static int freeze_mounts(struct mount_ent *v, size_t n, char *failed, size_t failed_len)
{
    for (size_t i = n; i-- > 0;) {
        int seen = 0;
        for (size_t j = i + 1; j < n && !seen; j++)
            seen = v[j].maj == v[i].maj && v[j].min == v[i].min;
        if (seen)
            continue; /* the same file system mounted twice: frozen once */
        int fd = open(v[i].path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
        if (fd < 0) {
            logmsg("freeze: skipping %s: %s", v[i].path, strerror(errno));
            continue;
        }
        if (ioctl(fd, FIFREEZE, 0) < 0) {
            int err = errno;
            close(fd);
            if (err == EOPNOTSUPP || err == EBUSY)
                continue;
            snprintf(failed, failed_len, "%s", v[i].path);
            thaw_all(NULL);
            return err;
        }
        frozen = xrealloc(frozen, (nfrozen + 1) * sizeof *frozen);
        frozen[nfrozen].fd = fd;
        frozen[nfrozen].path = xstrdup(v[i].path);
        nfrozen++;
    }
    return 0;
}

static void handle_fsfreeze(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    uint32_t ms = rd_u32(&r);
    if (r.bad || r.off != len) {
        send_error(id, EINVAL, "malformed FSFREEZE payload");
        return;
    }
    if (freeze_deadline) {
        send_error(id, EBUSY, "the file systems are frozen already: thaw them first");
        return;
    }
    if (ms == 0)
        ms = FREEZE_DEFAULT_MS;
    if (ms > FREEZE_MAX_MS)
        ms = FREEZE_MAX_MS;
    sync();
    size_t n;
    struct mount_ent *v;
    int err = writable_block_mounts(&v, &n);
    if (err) {
        send_error(id, err, "cannot read /proc/self/mountinfo: %s", strerror(err));
        return;
    }
    char failed[512] = "";
    err = freeze_mounts(v, n, failed, sizeof failed);
    for (size_t i = 0; i < n; i++)
        free(v[i].path);
    free(v);
    if (err) {
        send_error(id, err, "cannot freeze %s: %s", failed, strerror(err));
        return;
    }
    if (nfrozen)
        freeze_deadline = now_ms() + ms;
    struct pbuf b = {0};
    pb_u32(&b, (uint32_t)nfrozen);
    for (size_t i = 0; i < nfrozen; i++)
        pb_str(&b, frozen[i].path, strlen(frozen[i].path));
    send_frame(T_OK, id, b.p, b.len);
    free(b.p);
}

static void handle_fsthaw(uint32_t id, const uint8_t *p, uint32_t len)
{
    (void)p;
    if (len != 0) {
        send_error(id, EINVAL, "malformed FSTHAW payload");
        return;
    }
    uint8_t pay[4];
    put32(pay, thaw_all(NULL));
    send_frame(T_OK, id, pay, sizeof pay);
}

/* Called from the main loop: the host did not thaw in time. Returns the poll timeout
 * (ms) until the deadline, or -1 when nothing is frozen. */
static int check_freeze(void)
{
    if (!freeze_deadline)
        return -1;
    int64_t left = freeze_deadline - now_ms();
    if (left > 0)
        return left > INT32_MAX ? INT32_MAX : (int)left;
    thaw_all("the host did not thaw them in time");
    return -1;
}

static void shutdown_agent(void);

/* ------------------------------------------------------------------------------ */
/* Power                                                                            */

static void handle_poweroff(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r = {p, len, 0, 0};
    uint8_t mode = rd_u8(&r);
    if (r.bad || r.off != len || mode > 1) {
        send_error(id, EINVAL, "malformed POWEROFF payload");
        return;
    }
    thaw_all("powering off");
    sync();
    send_frame(T_OK, id, NULL, 0);
    /* PID 1 must never exit (the kernel would panic), so it ignores --no-poweroff. */
    if (no_poweroff && !is_pid1)
        shutdown_agent();
    if (reboot(mode == 1 ? RB_AUTOBOOT : RB_POWER_OFF) < 0)
        logmsg("reboot: %s", strerror(errno));
}

/* ------------------------------------------------------------------------------ */
/* Input                                                                            */

static void handle_frame(uint8_t type, uint32_t stream, const uint8_t *p, uint32_t len)
{
    switch (type) {
    case T_HELLO:
        send_hello();
        break;
    case T_EXEC:
        handle_exec(stream, p, len);
        break;
    case T_STDIN:
        handle_stdin(stream, p, len);
        break;
    case T_SIGNAL:
        handle_signal(stream, p, len);
        break;
    case T_RESIZE:
        handle_resize(stream, p, len);
        break;
    case T_FILE_PUT:
        handle_file_put(stream, p, len);
        break;
    case T_FILE_GET:
        handle_file_get(stream, p, len);
        break;
    case T_DATA:
        handle_data(stream, p, len);
        break;
    case T_POWEROFF:
        handle_poweroff(stream, p, len);
        break;
    case T_FSFREEZE:
        handle_fsfreeze(stream, p, len);
        break;
    case T_FSTHAW:
        handle_fsthaw(stream, p, len);
        break;
    default:
        send_error(stream, EINVAL, "unknown frame type 0x%02x", type);
        break;
    }
}

static void process_input(void)
{
    size_t off = 0;
    while (rlen - off >= HDR && !lost) {
        const uint8_t *h = rbuf + off;
        uint32_t len = be32(h + 8);
        if (be16(h) != MAGIC || h[2] != PROTO_VERSION || len > MAX_PAYLOAD) {
            if (!resyncing) {
                send_error(0, EPROTO, "bad frame header (magic %04x version %u length %u), "
                                      "skipping to the next frame", be16(h), h[2], len);
                resyncing = 1;
            }
            off++;
            continue;
        }
        if (rlen - off < HDR + (size_t)len)
            break;
        resyncing = 0;
        off += HDR + (size_t)len;
        handle_frame(h[3], be32(h + 4), h + HDR, len);
    }
    if (off) {
        memmove(rbuf, rbuf + off, rlen - off);
        rlen -= off;
    }
}

/* Returns -1 when the host is gone. */
static int read_port(void)
{
    ssize_t n;
    do
        n = read(port_fd, rbuf + rlen, rcap - rlen);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? 0 : -1;
    if (n == 0)
        return -1;
    rlen += (size_t)n;
    process_input();
    return 0;
}

/* ------------------------------------------------------------------------------ */
/* Signals and children                                                             */

static void on_signal(int sig)
{
    int saved = errno;
    if (sig == SIGTERM || sig == SIGINT)
        got_term = 1;
    ssize_t w = write(sig_pipe[1], "x", 1);
    (void)w;
    errno = saved;
}

static void drain_sig_pipe(void)
{
    char buf[64];
    while (read(sig_pipe[0], buf, sizeof buf) > 0)
        ;
}

static void reap_children(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (struct exec_s *e = execs; e; e = e->next) {
            if (e->pid == pid && !e->exited) {
                e->exited = 1;
                e->status = st;
                if (e->out_fd >= 0 || e->err_fd >= 0)
                    e->drain_deadline = now_ms() + DRAIN_MS;
                break;
            }
        }
    }
}

/* Kills every session and exits, after collecting the killed processes for up to
 * half a second so none is left behind as a zombie of whoever inherits it. */
static void shutdown_agent(void)
{
    drop_all_sessions();
    thaw_all("the agent is stopping");
    int64_t end = now_ms() + 500;
    while (now_ms() < end) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid < 0 && errno == ECHILD)
            break;
        if (pid <= 0)
            sleep_ms(5);
    }
    exit(0);
}

static void handle_signals(void)
{
    drain_sig_pipe();
    reap_children();
    if (got_term) {
        got_term = 0;
        if (!is_pid1)
            shutdown_agent();
    }
}

/* Timeouts, output drain limits, and finished sessions. Returns the poll timeout. */
static int check_sessions(void)
{
    int64_t now = now_ms();
    int64_t next = -1;
    for (struct exec_s **pp = &execs; *pp;) {
        struct exec_s *e = *pp;
        if (!e->exited && e->deadline && now >= e->deadline && !e->timed_out) {
            e->timed_out = 1;
            kill(-e->pid, SIGKILL);
        }
        if (e->exited && e->drain_deadline && now >= e->drain_deadline) {
            /* A background grandchild still holds the output open: stop waiting. */
            close_fd(&e->out_fd);
            close_fd(&e->err_fd);
        }
        if (e->exited && e->out_fd < 0 && e->err_fd < 0) {
            send_exit(e);
            *pp = e->next;
            free_exec(e);
            continue;
        }
        int64_t d = -1;
        if (!e->exited && e->deadline && !e->timed_out)
            d = e->deadline;
        if (e->exited && e->drain_deadline)
            d = e->drain_deadline;
        if (d >= 0 && (next < 0 || d < next))
            next = d;
        pp = &e->next;
    }
    if (gets)
        return 0;
    if (next < 0)
        return -1;
    return next <= now ? 0 : (int)(next - now);
}

/* ------------------------------------------------------------------------------ */
/* The port                                                                         */

static int find_port_by_name(const char *name)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *de;
    int fd = -1;
    while ((de = readdir(d)) != NULL && fd < 0) {
        if (de->d_name[0] == '.')
            continue;
        char path[512], buf[256];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
        int nf = open(path, O_RDONLY | O_CLOEXEC);
        if (nf < 0)
            continue;
        ssize_t n = read(nf, buf, sizeof buf - 1);
        close(nf);
        if (n <= 0)
            continue;
        buf[n] = 0;
        buf[strcspn(buf, "\n")] = 0;
        if (strcmp(buf, name) != 0)
            continue;
        snprintf(path, sizeof path, "/dev/%s", de->d_name);
        fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    }
    closedir(d);
    return fd;
}

static int open_port(const char *name, const char *path)
{
    int64_t start = now_ms();
    for (;;) {
        int fd = path ? open(path, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
                      : find_port_by_name(name);
        if (fd >= 0)
            return fd;
        if (now_ms() - start >= PORT_WAIT_MS) {
            if (!is_pid1)
                return -1;
            /* PID 1 must not exit: keep trying, and say so now and then. */
            logmsg("still waiting for port %s", path ? path : name);
            start = now_ms();
        }
        /* The port appears a moment after virtio_console probes it; the host is
         * waiting for our hello, so look often. */
        sleep_ms(2);
    }
}

/* Called while the host is not connected: returns once it is. */
static void wait_connected(void)
{
    for (;;) {
        struct pollfd p = {port_fd, POLLIN | POLLOUT, 0};
        int r = poll(&p, 1, 0);
        if (r >= 0 && !(p.revents & (POLLHUP | POLLERR | POLLNVAL)))
            break;
        /* No wakeup exists for "the host connected": poll the signal pipe meanwhile so
         * children are still reaped. */
        struct pollfd s = {sig_pipe[0], POLLIN, 0};
        if (poll(&s, 1, RECONNECT_POLL_MS) > 0)
            handle_signals();
    }
    connected = 1;
    lost = 0;
    send_hello();
}

static void disconnect(void)
{
    connected = 0;
    drop_all_sessions();
    thaw_all("the host went away");
}

/* ------------------------------------------------------------------------------ */
/* Init mode: PID 1 of the minimal image                                           */
/*
 * Started as /init, the agent sets up the guest itself instead of through a shell
 * script: under TCG every fork and exec of busybox costs milliseconds, and boot time is
 * what a sandbox user waits for. Disk images (vz.root=) still go through /init.sh,
 * which mounts the root disk and switches to the real init.
 */

#define MODULES_MAX_DEPTH 8

static char *modules_dep; /* the whole modules.dep, NUL-terminated */
static char modules_dir[256];

static void read_modules_dep(void)
{
    struct utsname u;
    if (uname(&u) < 0)
        return;
    snprintf(modules_dir, sizeof modules_dir, "/lib/modules/%s", u.release);
    char path[320];
    snprintf(path, sizeof path, "%s/modules.dep", modules_dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    size_t cap = 65536, len = 0;
    char *buf = xrealloc(NULL, cap);
    for (;;) {
        if (len + 1 >= cap)
            buf = xrealloc(buf, cap *= 2);
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = 0;
    modules_dep = buf;
}

/* The modules.dep line of module `name` (e.g. "virtio_console"), or NULL. */
static const char *dep_line(const char *name, size_t namelen)
{
    for (const char *line = modules_dep; line && *line;) {
        const char *colon = strchr(line, ':');
        const char *eol = strchr(line, '\n');
        if (!colon || (eol && colon > eol))
            return NULL;
        const char *base = colon;
        while (base > line && base[-1] != '/')
            base--;
        if ((size_t)(colon - base) == namelen + 3 && strncmp(base, name, namelen) == 0 &&
            strncmp(base + namelen, ".ko", 3) == 0)
            return line;
        line = eol ? eol + 1 : NULL;
    }
    return NULL;
}

static void load_module_path(const char *rel, size_t rellen, int depth);

static void load_module(const char *name, size_t namelen, int depth)
{
    const char *line = depth < MODULES_MAX_DEPTH ? dep_line(name, namelen) : NULL;
    if (!line) {
        logmsg("init: module %.*s not found", (int)namelen, name);
        return;
    }
    const char *colon = strchr(line, ':');
    const char *eol = strchr(colon, '\n');
    if (!eol)
        eol = colon + strlen(colon);
    /* Dependencies are listed so that loading them last-to-first satisfies each. */
    const char *deps[32];
    size_t lens[32];
    int ndeps = 0;
    for (const char *p = colon + 1; p < eol && ndeps < 32;) {
        while (p < eol && *p == ' ')
            p++;
        const char *q = p;
        while (q < eol && *q != ' ')
            q++;
        if (q > p) {
            deps[ndeps] = p;
            lens[ndeps++] = (size_t)(q - p);
        }
        p = q;
    }
    for (int i = ndeps - 1; i >= 0; i--)
        load_module_path(deps[i], lens[i], depth + 1);
    load_module_path(line, (size_t)(colon - line), depth);
}

static void load_module_path(const char *rel, size_t rellen, int depth)
{
    (void)depth;
    char path[512];
    snprintf(path, sizeof path, "%s/%.*s", modules_dir, (int)rellen, rel);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        logmsg("init: %s: %s", path, strerror(errno));
        return;
    }
    if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
        logmsg("init: loading %s: %s", path, strerror(errno));
    close(fd);
}

static void load(const char *name)
{
    load_module(name, strlen(name), 0);
}

static int dir_has_entries(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return 0;
    struct dirent *de;
    int found = 0;
    while (!found && (de = readdir(d)) != NULL)
        found = de->d_name[0] != '.';
    closedir(d);
    return found;
}

/* Load the drivers of the virtio devices present (ids from the virtio spec). */
static void load_virtio_drivers(void)
{
    DIR *d = opendir("/sys/bus/virtio/devices");
    if (!d)
        return;
    int want_net = 0, want_blk = 0, want_console = 0, want_rng = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char path[320], buf[32];
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", de->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = 0;
        switch (strtol(buf, NULL, 16)) {
        case 1: want_net = 1; break;
        case 2: want_blk = 1; break;
        case 3: want_console = 1; break;
        case 4: want_rng = 1; break;
        }
    }
    closedir(d);
    /* The agent's port first: it is what the host waits for. */
    if (want_console)
        load("virtio_console");
    if (want_blk)
        load("virtio_blk");
    if (want_net)
        load("virtio_net");
    if (want_rng)
        load("virtio_rng");
}

static void mount_or_log(const char *src, const char *dst, const char *type, unsigned long flags,
                         const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
        logmsg("init: mount %s on %s: %s", type, dst, strerror(errno));
}

static void early_init(void)
{
    mount_or_log("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    char cmdline[4096] = "";
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(fd);
    }
    for (char *tok = strtok(cmdline, " \n"); tok; tok = strtok(NULL, " \n")) {
        if (strncmp(tok, "vz.root=", 8) == 0) {
            /* A disk image: the shell script mounts it and switches root. */
            execl("/bin/sh", "sh", "/init.sh", (char *)NULL);
            logmsg("init: cannot run /init.sh: %s", strerror(errno));
        } else if (strncmp(tok, "vz.hostname=", 12) == 0) {
            if (sethostname(tok + 12, strlen(tok + 12)) < 0)
                logmsg("init: sethostname: %s", strerror(errno));
        }
    }
    mount_or_log("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_log("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    int c = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (c >= 0)
        log_fd = c;
    read_modules_dep();
    /* microvm has its virtio devices on virtio-mmio, a q35 VM on PCI. */
    load(dir_has_entries("/sys/bus/pci/devices") ? "virtio_pci" : "virtio_mmio");
    load_virtio_drivers();
    free(modules_dep);
    modules_dep = NULL;
    mount_or_log("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                 "gid=5,mode=620,ptmxmode=666");
    mount_or_log("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_or_log("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755");
    setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
}

/* ------------------------------------------------------------------------------ */
/* Reaper mode: PID 1 of a system container                                        */
/*
 * A container needs no port: vz-runtime exec joins its namespaces. It needs a PID 1
 * that collects orphans and stops the container when asked: SIGTERM (or busybox
 * poweroff's SIGUSR2, halt's SIGUSR1, SIGPWR, SIGINT) asks every process to go, waits
 * up to 5 s, kills the rest and exits.
 */
static int reaper_main(void)
{
    sigset_t set;
    sigemptyset(&set);
    int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGPWR, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaddset(&set, sigs[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGCHLD) {
            while (waitpid(-1, NULL, WNOHANG) > 0)
                ;
            continue;
        }
        kill(-1, SIGTERM);
        int64_t deadline = now_ms() + 5000;
        while (now_ms() < deadline) {
            pid_t p = waitpid(-1, NULL, WNOHANG);
            if (p < 0 && errno == ECHILD)
                break;
            if (p <= 0)
                sleep_ms(10);
        }
        kill(-1, SIGKILL);
        return 0;
    }
}

/* ------------------------------------------------------------------------------ */
/* Main                                                                             */

static void usage(void)
{
    logmsg("usage: vz-agent [--port-name NAME | --port PATH | --fd N] [--no-poweroff] | --reaper");
}

static void ensure_stdio(void)
{
    /* If started with 0-2 closed, a pipe could land there and then be clobbered by
     * dup2 in a child. */
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) < 0) {
            int n = open("/dev/null", O_RDWR);
            if (n >= 0 && n != fd)
                close(n);
        }
    }
}

int main(int argc, char **argv)
{
    const char *port_name = "org.vzkit.agent";
    const char *port_path = NULL;
    int inherited_fd = -1;
    int reaper = 0;

    is_pid1 = getpid() == 1;
    if (is_pid1) {
        const char *base = strrchr(argv[0], '/');
        if (strcmp(base ? base + 1 : argv[0], "init") == 0)
            early_init();
    }
    ensure_stdio();
    if (is_pid1) {
        int c = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
        if (c >= 0)
            log_fd = c;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--port-name") == 0 && i + 1 < argc) {
            port_name = argv[++i];
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            port_path = argv[++i];
        } else if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0) {
                usage();
                return 2;
            }
            inherited_fd = (int)v;
        } else if (strcmp(argv[i], "--no-poweroff") == 0) {
            no_poweroff = 1;
        } else if (strcmp(argv[i], "--reaper") == 0) {
            reaper = 1;
        } else if (strcmp(argv[i], "--version") == 0) {
            logmsg("%s (protocol %d)", AGENT_VERSION, PROTO_VERSION);
            return 0;
        } else {
            usage();
            if (!is_pid1)
                return 2;
        }
    }

    if (reaper)
        return reaper_main();

    /* Dispositions ignored by whoever started the agent would be inherited by every
     * command; start from the defaults (see child_main). */
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP)
            signal(s, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    /* Commands that daemonise leave orphans behind; as a subreaper the agent collects
     * them itself (as PID 1 it does anyway) instead of relying on the real init. */
    if (!is_pid1)
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    while (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        logmsg("pipe: %s", strerror(errno));
        sleep_ms(1000);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    if (inherited_fd >= 0) {
        port_fd = inherited_fd;
        set_cloexec(port_fd);
        set_nonblock(port_fd);
    } else {
        port_fd = open_port(port_name, port_path);
        if (port_fd < 0) {
            logmsg("cannot open port %s: %s", port_path ? port_path : port_name, strerror(errno));
            return 1;
        }
    }

    rcap = HDR + MAX_PAYLOAD + CHUNK;
    rbuf = xrealloc(NULL, rcap);
    obuf = xrealloc(NULL, CHUNK);

    struct pollfd *pfds = NULL;
    struct exec_s **owner = NULL;
    int *which = NULL;
    size_t pcap = 0;

    for (;;) {
        if (lost) {
            disconnect();
            lost = 0;
        }
        if (!connected)
            wait_connected();

        int timeout = check_sessions();
        int thaw_in = check_freeze();
        if (thaw_in >= 0 && (timeout < 0 || thaw_in < timeout))
            timeout = thaw_in;
        if (lost)
            continue;

        size_t need = 2;
        int backpressure = 0;
        for (struct exec_s *e = execs; e; e = e->next) {
            need += 3;
            if (e->inlen - e->inoff > STDIN_HIGH_WATER)
                backpressure = 1;
        }
        if (need > pcap) {
            pcap = need * 2;
            pfds = xrealloc(pfds, pcap * sizeof *pfds);
            owner = xrealloc(owner, pcap * sizeof *owner);
            which = xrealloc(which, pcap * sizeof *which);
        }
        size_t n = 0;
        pfds[n++] = (struct pollfd){port_fd, (short)(backpressure ? 0 : POLLIN), 0};
        pfds[n++] = (struct pollfd){sig_pipe[0], POLLIN, 0};
        for (struct exec_s *e = execs; e; e = e->next) {
            if (e->out_fd >= 0) {
                owner[n] = e;
                which[n] = 1;
                pfds[n++] = (struct pollfd){e->out_fd, POLLIN, 0};
            }
            if (e->err_fd >= 0) {
                owner[n] = e;
                which[n] = 2;
                pfds[n++] = (struct pollfd){e->err_fd, POLLIN, 0};
            }
            if (e->in_fd >= 0 && e->inoff < e->inlen) {
                owner[n] = e;
                which[n] = 0;
                pfds[n++] = (struct pollfd){e->in_fd, POLLOUT, 0};
            }
        }

        int r = poll(pfds, (nfds_t)n, timeout);
        if (r < 0) {
            if (errno != EINTR) {
                logmsg("poll: %s", strerror(errno));
                sleep_ms(10);
            }
            continue;
        }
        if (pfds[1].revents)
            handle_signals();
        /* Children's output before port input: port input can start sessions (which
         * may reuse fd numbers) but never frees one, so owner[] stays valid. */
        for (size_t i = 2; i < n && !lost; i++) {
            if (!pfds[i].revents)
                continue;
            struct exec_s *e = owner[i];
            if (which[i] == 1 && e->out_fd == pfds[i].fd)
                pump_output(e, &e->out_fd, T_STDOUT);
            else if (which[i] == 2 && e->err_fd == pfds[i].fd)
                pump_output(e, &e->err_fd, T_STDERR);
            else if (which[i] == 0 && e->in_fd == pfds[i].fd) {
                if (pfds[i].revents & (POLLERR | POLLHUP)) {
                    close_fd(&e->in_fd);
                    e->inoff = e->inlen = 0;
                } else {
                    flush_stdin(e);
                }
            }
        }
        if (!lost && (pfds[0].revents & POLLIN)) {
            if (read_port() < 0)
                lost = 1;
        } else if (pfds[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            lost = 1;
        }
        if (!lost && gets)
            pump_gets();
    }
}
