//! The warm pool's template: one worker, its engine prepared, that forks a copy of itself
//! for each socket the gateway hands over. A fork of a prepared 4 MiB process costs a few
//! hundred microseconds where exec and engine start-up cost milliseconds, and its children
//! share the engine's untouched pages with it (copy on write).
//!
//! The protocol on the template's fd 0, after its `Template` frame: the gateway sends one
//! byte carrying one descriptor (`SCM_RIGHTS`), the worker's end of a fresh socket pair; the
//! template answers with the child's pid as four little-endian bytes, or a negative errno.
//!
//! Children are forked with `CLONE_PARENT`: their parent is the gateway, not the template,
//! so the gateway reaps them, `kill <pid>` behaves as for any worker, and a template that
//! dies takes no room with it. The template is single-threaded (`EngineKind::forks`), so no
//! thread or lock of it is lost half-way in a child.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Serves fork requests until the gateway closes the socket (`Ok(None)`); returns
/// `Ok(Some(socket))` in a child, which goes on as a prepared worker on that socket.
pub(super) fn serve() -> io::Result<Option<OwnedFd>> {
    let control = io::stdin();
    let control = control.as_fd();
    loop {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut byte)];
        let received = match recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(received) => received,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if received.bytes == 0 {
            return Ok(None);
        }
        let mut sockets = Vec::new();
        for message in received.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = message {
                // Owned from here on, so that every descriptor received is closed.
                sockets.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let answer = match sockets.pop() {
            None => -libc::EINVAL,
            Some(socket) => match fork_beside_template() {
                Ok(0) => return Ok(Some(socket)),
                Ok(pid) => pid,
                Err(errno) => -(errno as i32),
            },
        };
        nix::unistd::write(control, &answer.to_le_bytes()).map_err(io::Error::from)?;
    }
}

/// `fork`, except that the child's parent is this process's parent (`CLONE_PARENT`). A raw
/// `clone` with no new stack returns twice like `fork`: 0 in the child.
fn fork_beside_template() -> Result<i32, nix::errno::Errno> {
    // SAFETY: this process is single-threaded (see the module's comment), so the child gets a
    // consistent copy of every lock and allocator; it runs on in Rust code that expects that.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(pid as i32)
}
