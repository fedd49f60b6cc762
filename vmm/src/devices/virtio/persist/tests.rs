use std::io::Write;
use std::path::{Path, PathBuf};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::block::request::tests::{F_NEXT, F_WRITE, desc, mem};
use crate::devices::virtio::block::request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::devices::virtio::mmio::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::vsock::device::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::vsock::packet::{HOST_CID, Header, OP_REQUEST, OP_RST, TYPE_STREAM};

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const QSIZE: u16 = 16;

type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Queue `index` of the device is placed at its own 4 KiB page.
fn mock(m: &GuestMemoryMmap, index: u64) -> Mock<'_> {
    MockSplitQueue::create(m, GuestAddress(0x8000 + index * 0x1000), QSIZE)
}

/// The driver's side of the handshake, with every mock queue set up and ready.
fn bring_up(t: &mut MmioTransport, queues: &[&Mock<'_>]) {
    write(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(t, REG_DRIVER_FEATURES_SEL, 1);
    write(t, REG_DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    write(
        t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for (i, q) in queues.iter().enumerate() {
        write(t, REG_QUEUE_SEL, i as u32);
        write(t, REG_QUEUE_NUM, QSIZE.into());
        write(t, REG_QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
        write(t, REG_QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
        write(t, REG_QUEUE_DEVICE_LOW, q.used_addr().0 as u32);
        write(t, REG_QUEUE_READY, 1);
    }
    write(t, REG_STATUS, ALL_OK);
    assert!(t.is_activated());
}

/// A chain of `descs` at descriptor `offset` (NEXT flags and indices filled in).
fn add_chain(q: &Mock<'_>, descs: &[RawDescriptor], offset: u16) {
    let chained: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = Descriptor::from(*d);
            let last = i == descs.len() - 1;
            let flags = if last { d.flags() } else { d.flags() | F_NEXT };
            let next = if last { 0 } else { offset + i as u16 + 1 };
            RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
        })
        .collect();
    q.add_desc_chains(&chained, offset).unwrap();
}

fn used_idx(m: &GuestMemoryMmap, q: &Mock<'_>) -> u16 {
    m.read_obj(q.used_addr().unchecked_add(2)).unwrap()
}

/// (id, len) of used-ring entry `i`.
fn used_elem(m: &GuestMemoryMmap, q: &Mock<'_>, i: u64) -> (u32, u32) {
    let at = q.used_addr().unchecked_add(4 + 8 * i);
    (
        m.read_obj(at).unwrap(),
        m.read_obj(at.unchecked_add(4)).unwrap(),
    )
}

/// Through the serialized form, as a snapshot file holds it.
fn through_bytes(state: &TransportState) -> TransportState {
    postcard::from_bytes(&postcard::to_allocvec(state).unwrap()).unwrap()
}

fn restore(
    id: &str,
    state: TransportState,
    m: &GuestMemoryMmap,
) -> Result<MmioTransport, PersistError> {
    MmioTransport::restore(
        id,
        state,
        &DeviceOverrides::default(),
        m.clone(),
        interrupt(),
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cocoon-persist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn image(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(content)
        .unwrap();
    path
}

/// An activated rng transport that has served one chain and has a second one waiting.
fn served_rng(m: &GuestMemoryMmap) -> (MmioTransport, Mock<'_>) {
    let q = mock(m, 0);
    add_chain(&q, &[desc(0x10_0000, 32, F_WRITE)], 0);
    let mut t = MmioTransport::new(Box::new(Rng::new()), m.clone(), interrupt());
    bring_up(&mut t, &[&q]);
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(m, &q), 1);
    add_chain(&q, &[desc(0x11_0000, 48, F_WRITE)], 1);
    (t, q)
}

#[test]
fn a_restored_transport_serves_the_next_chain() {
    let m = mem();
    let (t, q) = served_rng(&m);
    let state = through_bytes(&t.save());
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (1, 1)
    );
    drop(t);

    let mut r = restore("rng0", state, &m).unwrap();
    assert_eq!(read(&mut r, REG_STATUS), ALL_OK);
    assert!(r.is_activated());
    // The interrupt the guest had not acknowledged is still pending.
    assert_eq!(read(&mut r, REG_INTERRUPT_STATUS), INT_USED_RING);
    write(&mut r, REG_INTERRUPT_ACK, INT_USED_RING);
    write(&mut r, REG_QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&m, &q), 2);
    assert_eq!(used_elem(&m, &q, 1), (1, 48));
    assert_eq!(read(&mut r, REG_INTERRUPT_STATUS), INT_USED_RING);
}

#[test]
fn after_restore_serves_chains_whose_kick_was_lost() {
    let m = mem();
    let (t, q) = served_rng(&m);
    let state = t.save();
    drop(t);
    let irq = interrupt();
    let mut r = MmioTransport::restore(
        "rng0",
        state,
        &DeviceOverrides::default(),
        m.clone(),
        irq.clone(),
    )
    .unwrap();
    r.after_restore();
    assert_eq!(used_idx(&m, &q), 2);
    assert_eq!(irq.irqfd().read().unwrap(), 1);
}

#[test]
fn an_unactivated_transport_restores_and_its_rings_are_checked_at_driver_ok() {
    let m = mem();
    let mut t = MmioTransport::new(Box::new(Rng::new()), m.clone(), interrupt());
    write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let mut state = t.save();
    // Rings outside memory are fine until the driver says DRIVER_OK.
    state.queues[0].desc_table = 0xfff_0000;
    let mut r = restore("rng0", state, &m).unwrap();
    assert!(!r.is_activated());
    assert_eq!(
        read(&mut r, REG_STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
}

type Mutation = dyn Fn(&mut TransportState);

#[test]
fn crafted_states_are_refused() {
    let m = mem();
    let (t, _q) = served_rng(&m);
    let good = t.save();
    let refused = |f: &dyn Fn(&mut TransportState), id: &str| {
        let mut s = good.clone();
        f(&mut s);
        restore(id, s, &m).map(|_| ()).unwrap_err()
    };
    let cases: Vec<(&str, Box<Mutation>)> = vec![
        (
            "size not a power of two",
            Box::new(|s| s.queues[0].size = 15),
        ),
        ("size above max", Box::new(|s| s.queues[0].size = 128)),
        ("size zero", Box::new(|s| s.queues[0].size = 0)),
        (
            "max not the device's",
            Box::new(|s| s.queues[0].max_size = 32),
        ),
        (
            "misaligned ring",
            Box::new(|s| s.queues[0].used_ring = 0x8001),
        ),
        (
            "rings outside memory",
            Box::new(|s| s.queues[0].desc_table = 0xfff_0000),
        ),
        (
            "ring end outside memory",
            Box::new(|s| s.queues[0].used_ring = 0xff_fff0),
        ),
        (
            "event idx",
            Box::new(|s| s.queues[0].event_idx_enabled = true),
        ),
        ("too many queues", Box::new(|s| s.queues.push(s.queues[0]))),
        ("no queues", Box::new(|s| s.queues.clear())),
        ("unknown status", Box::new(|s| s.status |= 0x10)),
        (
            "activated without DRIVER_OK",
            Box::new(|s| s.status = status::ACKNOWLEDGE),
        ),
        ("DRIVER_OK not activated", Box::new(|s| s.activated = false)),
        ("unoffered feature", Box::new(|s| s.driver_features |= 1)),
        ("legacy driver", Box::new(|s| s.driver_features = 0)),
        (
            "unknown interrupt bit",
            Box::new(|s| s.interrupt_status = 0x80),
        ),
    ];
    for (what, f) in &cases {
        let e = refused(f.as_ref(), "rng0");
        assert!(e.to_string().contains("rng0"), "{what}: {e}");
    }
    // The id names another kind, or none.
    assert!(matches!(
        refused(&|_| {}, "block0"),
        PersistError::KindMismatch { found: "rng", .. }
    ));
    for id in ["foo0", "rng", "0", ""] {
        assert!(
            matches!(refused(&|_| {}, id), PersistError::UnknownId(_)),
            "{id}"
        );
    }
    // A disk override for a device that is no disk.
    let mut over = DeviceOverrides::default();
    over.disks.insert(
        "rng0".into(),
        DiskConfig {
            path: "/nonexistent".into(),
            read_only: true,
        },
    );
    let e = MmioTransport::restore("rng0", good.clone(), &over, m.clone(), interrupt())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, PersistError::OverrideMismatch { .. }), "{e}");
    // A bad queue is refused before the host side is opened: the disk is never looked for.
    let mut s = good.clone();
    s.device = DeviceState::Block(BlockState {
        path: "/nonexistent/disk".into(),
        read_only: false,
        capacity: 8,
        read_only_offered: false,
    });
    s.queues[0].max_size = 64;
    let e = restore("block0", s, &m).map(|_| ()).unwrap_err();
    assert!(matches!(e, PersistError::Queue { .. }), "{e}");
}

/// An IN request for `sector` into 512 bytes at 0x20_0000, status at 0x30_0000.
fn read_request(m: &GuestMemoryMmap, q: &Mock<'_>, offset: u16, sector: u64) {
    crate::devices::virtio::block::request::tests::write_header(
        m,
        0x10_0000,
        VIRTIO_BLK_T_IN,
        sector,
    );
    m.write_obj(0xffu8, GuestAddress(0x30_0000)).unwrap();
    add_chain(
        q,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        offset,
    );
}

fn request_status(m: &GuestMemoryMmap) -> u8 {
    m.read_obj(GuestAddress(0x30_0000)).unwrap()
}

fn capacity(t: &mut MmioTransport) -> u64 {
    let mut cap = [0u8; 8];
    t.read(CONFIG_SPACE, &mut cap);
    u64::from_le_bytes(cap)
}

#[test]
fn an_empty_disk_is_a_spare_slot_until_a_swap_fills_it() {
    let dir = temp_dir("swap");
    let empty = image(&dir, "empty.img", &[]);
    let content: Vec<u8> = (0..8192u32).map(|i| (i / 512) as u8 ^ 0x5a).collect();
    let full = image(&dir, "full.img", &content);
    let m = mem();
    let q = mock(&m, 0);
    let irq = interrupt();
    let disk = Disk::open(&empty, false).unwrap();
    assert_eq!(disk.capacity(), 0);
    let mut t = MmioTransport::new(Box::new(Block::new(disk)), m.clone(), irq.clone());
    bring_up(&mut t, &[&q]);
    assert_eq!(capacity(&mut t), 0);

    // Reads and writes of a 0-sector disk fail cleanly.
    read_request(&m, &q, 0, 0);
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(request_status(&m), VIRTIO_BLK_S_IOERR);
    crate::devices::virtio::block::request::tests::write_header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 7);
    add_chain(
        &q,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, 0),
            desc(0x30_0000, 1, F_WRITE),
        ],
        3,
    );
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(request_status(&m), VIRTIO_BLK_S_IOERR);
    assert_eq!(used_idx(&m, &q), 2);
    write(&mut t, REG_INTERRUPT_ACK, u32::MAX);
    irq.irqfd().read().unwrap();

    let generation = read(&mut t, REG_CONFIG_GENERATION);
    t.swap_disk(DiskConfig {
        path: full.clone(),
        read_only: true,
    })
    .unwrap();
    assert_eq!(capacity(&mut t), 16);
    assert_eq!(read(&mut t, REG_CONFIG_GENERATION), generation + 1);
    assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_eq!(irq.irqfd().read().unwrap(), 1);
    // The features the driver accepted do not change under it.
    write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(read(&mut t, REG_DEVICE_FEATURES) as u64 & (1 << 5), 0);

    read_request(&m, &q, 6, 9);
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(request_status(&m), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(got, content[9 * 512..10 * 512]);

    // The same image again, now writable: our own lock must not stand in the way.
    t.swap_disk(DiskConfig {
        path: full.clone(),
        read_only: false,
    })
    .unwrap();
    t.swap_disk(DiskConfig {
        path: full.clone(),
        read_only: false,
    })
    .unwrap();
    assert_eq!(read(&mut t, REG_CONFIG_GENERATION), generation + 3);
    // And it is still locked against anyone else.
    assert!(Disk::open(&full, false).is_err());
    // A missing image leaves the current one in place.
    assert!(matches!(
        t.swap_disk(DiskConfig {
            path: dir.join("missing.img"),
            read_only: false,
        }),
        Err(SwapError::Disk(_))
    ));
    assert_eq!(capacity(&mut t), 16);

    let mut rng = MmioTransport::new(Box::new(Rng::new()), m.clone(), interrupt());
    assert!(matches!(
        rng.swap_disk(DiskConfig {
            path: full,
            read_only: true,
        }),
        Err(SwapError::NotBlock(4))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_restored_disk_of_another_size_is_announced() {
    let dir = temp_dir("blkrestore");
    let small = image(&dir, "small.img", &[1u8; 4096]);
    let big = image(&dir, "big.img", &[2u8; 8192]);
    let m = mem();
    let q = mock(&m, 0);
    let mut t = MmioTransport::new(
        Box::new(Block::new(Disk::open(&small, false).unwrap())),
        m.clone(),
        interrupt(),
    );
    bring_up(&mut t, &[&q]);
    let state = through_bytes(&t.save());
    let DeviceState::Block(b) = &state.device else {
        panic!("not a block state");
    };
    assert_eq!(
        (b.path.as_path(), b.read_only, b.capacity),
        (small.as_path(), false, 8)
    );
    drop(t);

    // As saved: same size, nothing to announce.
    let mut r = restore("block0", state.clone(), &m).unwrap();
    assert_eq!(read(&mut r, REG_INTERRUPT_STATUS), 0);
    drop(r);

    let mut over = DeviceOverrides::default();
    over.disks.insert(
        "block0".into(),
        DiskConfig {
            path: big,
            read_only: true,
        },
    );
    let irq = interrupt();
    let mut r =
        MmioTransport::restore("block0", state.clone(), &over, m.clone(), irq.clone()).unwrap();
    assert_eq!(capacity(&mut r), 16);
    assert_eq!(
        read(&mut r, REG_CONFIG_GENERATION),
        state.config_generation + 1
    );
    assert_eq!(read(&mut r, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert!(
        irq.irqfd().read().is_err(),
        "nothing raised before after_restore"
    );
    r.after_restore();
    assert_eq!(irq.irqfd().read().unwrap(), 1);

    // A vanished image is an error naming the device.
    std::fs::remove_file(&small).unwrap();
    let e = restore("block0", state, &m).map(|_| ()).unwrap_err();
    assert!(
        matches!(e, PersistError::Disk { .. }) && e.to_string().contains("block0"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn guest_request(dst_port: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port,
        type_: TYPE_STREAM,
        op: OP_REQUEST,
        buf_alloc: 65536,
        ..Header::default()
    }
}

#[test]
fn a_restored_vsock_has_no_connections() {
    let dir = temp_dir("vsockdev");
    let path = dir.join("v.sock");
    let mut companion = path.clone().into_os_string();
    companion.push("_7000");
    let _listener = std::os::unix::net::UnixListener::bind(&companion).unwrap();
    let m = mem();
    let mocks: Vec<Mock<'_>> = (0..3).map(|i| mock(&m, i)).collect();
    m.write_slice(&guest_request(7000).to_bytes(), GuestAddress(0x40_0000))
        .unwrap();
    add_chain(&mocks[TX_QUEUE], &[desc(0x40_0000, 44, 0)], 0);
    let mut queues: Vec<Queue> = mocks.iter().map(|q| q.create_queue().unwrap()).collect();
    let mut vsock = Vsock::new(3, &path).unwrap();
    vsock.process_queue(TX_QUEUE, &mut queues, &m);
    assert_eq!(vsock.connection_count(), 1);
    // As if the host had made connections: the restored device must not reuse their ports.
    let next = vsock.next_port() + 7;
    vsock.continue_ports_from(next);

    let DeviceState::Vsock(state) = vsock.save() else {
        panic!("not a vsock state");
    };
    assert_eq!((state.cid, state.uds_path.as_path()), (3, path.as_path()));
    let moved = dir.join("moved.sock");
    let restored = state.restore("vsock0", Some(&moved)).unwrap();
    assert_eq!(restored.connection_count(), 0);
    assert_eq!(restored.uds_path(), moved);
    assert_eq!(
        restored.next_port(),
        next,
        "host ports go on where they were"
    );
    assert!(std::os::unix::net::UnixStream::connect(&moved).is_ok());

    let low = VsockState {
        next_port: 5,
        ..state.clone()
    };
    let clamped = low.restore("vsock0", Some(&dir.join("low.sock"))).unwrap();
    assert!(
        clamped.next_port() >= 1 << 30,
        "below the host range: starts at its start"
    );
    let bad = VsockState { cid: 2, ..state };
    assert!(matches!(
        bad.restore("vsock0", None),
        Err(PersistError::Device { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn after_restore_a_vsock_announces_the_transport_reset() {
    let dir = temp_dir("vsockreset");
    let m = mem();
    let mocks: Vec<Mock<'_>> = (0..3).map(|i| mock(&m, i)).collect();
    m.write_obj(0xffff_ffffu32, GuestAddress(0x20_0000))
        .unwrap();
    add_chain(&mocks[EVENT_QUEUE], &[desc(0x20_0000, 4, F_WRITE)], 0);
    add_chain(&mocks[RX_QUEUE], &[desc(0x50_0000, 4096, F_WRITE)], 0);
    let vsock = Vsock::new(3, &dir.join("v.sock")).unwrap();
    let mut t = MmioTransport::new(Box::new(vsock), m.clone(), interrupt());
    bring_up(&mut t, &[&mocks[0], &mocks[1], &mocks[2]]);
    let state = through_bytes(&t.save());
    drop(t);

    let over = DeviceOverrides {
        vsock_uds: Some(dir.join("restored.sock")),
        ..Default::default()
    };
    let irq = interrupt();
    let mut r = MmioTransport::restore("vsock0", state, &over, m.clone(), irq.clone()).unwrap();
    assert_eq!(
        used_idx(&m, &mocks[EVENT_QUEUE]),
        0,
        "nothing before after_restore"
    );
    r.after_restore();
    assert_eq!(used_idx(&m, &mocks[EVENT_QUEUE]), 1);
    assert_eq!(used_elem(&m, &mocks[EVENT_QUEUE], 0), (0, 4));
    let event: u32 = m.read_obj(GuestAddress(0x20_0000)).unwrap();
    assert_eq!(event, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    assert_eq!(read(&mut r, REG_INTERRUPT_STATUS), INT_USED_RING);
    assert_eq!(irq.irqfd().read().unwrap(), 1);

    // A packet of a connection from before the snapshot gets a reset.
    m.write_slice(
        &Header {
            op: crate::devices::virtio::vsock::packet::OP_RW,
            dst_port: 7000,
            len: 0,
            ..guest_request(7000)
        }
        .to_bytes(),
        GuestAddress(0x40_0000),
    )
    .unwrap();
    add_chain(&mocks[TX_QUEUE], &[desc(0x40_0000, 44, 0)], 0);
    write(&mut r, REG_QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(used_idx(&m, &mocks[RX_QUEUE]), 1);
    let mut hdr = [0u8; 44];
    m.read_slice(&mut hdr, GuestAddress(0x50_0000)).unwrap();
    assert_eq!(Header::from_bytes(&hdr).op, OP_RST);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_net_override_cannot_change_the_guests_mac() {
    use super::super::net::persist::{NetState, SavedTap};
    use crate::config::TapSource;
    let state = NetState {
        tap: SavedTap::Name("tap0".into()),
        mac: [2, 0, 0, 0, 0, 1],
    };
    let over = NetConfig {
        tap: TapSource::Name("tap1".into()),
        mac: [2, 0, 0, 0, 0, 2],
    };
    let e = state
        .restore("net0", Some(&over), 0)
        .map(|_| ())
        .unwrap_err();
    assert!(
        e.to_string().contains("net0") && e.to_string().contains("02:00:00:00:00:01"),
        "{e}"
    );
    let multicast = NetState {
        mac: [1, 0, 0, 0, 0, 1],
        ..state.clone()
    };
    assert!(multicast.restore("net0", None, 0).is_err());
    // Same MAC, no TAP: the clone's NIC stays detached.
    let detached = NetConfig {
        tap: TapSource::Detached,
        mac: state.mac,
    };
    let net = state
        .restore("net0", Some(&detached), FEATURES_ALL)
        .unwrap();
    assert_eq!(net.tap_name(), None);
    assert_eq!(NetState::save(&net).tap, SavedTap::Detached);
    // A bad fd is refused with the device named.
    let bad_fd = NetConfig {
        tap: TapSource::Fd(999_999),
        mac: state.mac,
    };
    let e = state
        .restore("net1", Some(&bad_fd), 0)
        .map(|_| ())
        .unwrap_err();
    assert!(
        e.to_string().contains("net1") && e.to_string().contains("999999"),
        "{e}"
    );
}

const FEATURES_ALL: u64 = super::super::net::device::FEATURES;

/// A NIC saved with an fd-passed TAP comes back detached; restored with a TAP fd, it gets the
/// offloads of the features its driver had accepted.
#[test]
fn a_detached_nic_is_restored_onto_a_tap_fd() {
    use super::super::net::Net;
    use super::super::net::persist::{NetState, SavedTap};
    use super::super::net::tap::Tap;
    use super::super::net::tap::tests::{in_new_netns, raw_tun};
    use crate::config::TapSource;
    use std::os::fd::AsRawFd;
    let Some(()) = in_new_netns(|| {
        let flags = 0x0002 | 0x1000 | 0x4000;
        let first = raw_tun("tmpl0", flags);
        let net = Net::new(
            Some(Tap::from_fd(first.as_raw_fd()).unwrap()),
            [2, 0, 0, 0, 0, 7],
        )
        .unwrap();
        let state = NetState::save(&net);
        assert_eq!(state.tap, SavedTap::Detached, "an fd cannot be saved");
        let clone = raw_tun("clone0", flags);
        let over = NetConfig {
            tap: TapSource::Fd(clone.as_raw_fd()),
            mac: [2, 0, 0, 0, 0, 7],
        };
        let restored = state.restore("net0", Some(&over), FEATURES_ALL).unwrap();
        assert_eq!(restored.tap_name(), Some("clone0"));
        // The named form is kept by name.
        let named = Net::new(Some(Tap::open("named0").unwrap()), [2, 0, 0, 0, 0, 8]).unwrap();
        assert_eq!(NetState::save(&named).tap, SavedTap::Name("named0".into()));
    }) else {
        eprintln!("SKIPPED a_detached_nic_is_restored_onto_a_tap_fd: needs root");
        return;
    };
}

#[test]
fn a_running_nic_takes_a_tap_and_gives_it_back() {
    use crate::devices::virtio::net::Net;
    use crate::devices::virtio::net::tap::tests::in_new_netns;
    let m = mem();
    let mut rng = MmioTransport::new(Box::new(Rng::new()), m.clone(), interrupt());
    assert!(matches!(
        rng.attach_tap(&TapSource::Detached),
        Err(AttachError::NotNet(4))
    ));
    let Some(()) = in_new_netns(move || {
        let net = Net::new(None, [2, 0, 0, 0, 0, 1]).unwrap();
        let mut t = MmioTransport::new(Box::new(net), m, interrupt());
        let name = |t: &mut MmioTransport| {
            t.device
                .as_net_mut()
                .and_then(|n| n.tap_name().map(str::to_owned))
        };
        assert_eq!(name(&mut t), None);
        t.attach_tap(&TapSource::Name("cocoontest1".into()))
            .unwrap();
        assert_eq!(name(&mut t).as_deref(), Some("cocoontest1"));
        // A bad source leaves the NIC as it was.
        assert!(matches!(
            t.attach_tap(&TapSource::Fd(-1)),
            Err(AttachError::Tap(_))
        ));
        assert_eq!(name(&mut t).as_deref(), Some("cocoontest1"));
        t.attach_tap(&TapSource::Detached).unwrap();
        assert_eq!(name(&mut t), None);
    }) else {
        eprintln!("SKIPPED a_running_nic_takes_a_tap_and_gives_it_back: needs root");
        return;
    };
}
