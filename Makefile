# cocoon: one KVM microVM per container.
#   make demo   set everything up and run a container (cocoon run) in a microVM
#   make test   set everything up and run all tests (what CI runs)
#   make bench  set everything up and print the performance figures
# Every target installs what it needs and is idempotent; the kernel build is cached outside the
# repository (COCOON_CACHE, default /var/cache/cocoon) under a hash of its inputs.

SHELL := /bin/bash
BUILD := $(CURDIR)/build
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/agent/cocoon-agent
VMM_BIN := target/release/cocoon-vmm
COCOON_BIN := target/release/cocoon
APT_PACKAGES := linux-source-6.1 linux-libc-dev build-essential flex bison bc libelf-dev cpio file \
	qemu-system-x86 busybox-static erofs-utils e2fsprogs python3 iproute2 util-linux \
	podman conmon umoci containerd runc crun runsc bsdutils debootstrap rsync skopeo docker.io

export COCOON_KERNEL := $(BUILD)/vmlinux
export COCOON_INITRD := $(BUILD)/initramfs.cpio
export COCOON_VMM := $(CURDIR)/$(VMM_BIN)
export COCOON_ROOTFS := $(BUILD)/busybox.erofs
export COCOON_BUSYBOX_DIR := $(BUILD)/busybox-rootfs
export COCOON_BIN := $(CURDIR)/$(COCOON_BIN)
export COCOON_OCI_IMAGE := $(BUILD)/busybox-oci.tar
export COCOON_DEBIAN_ROOTFS := $(BUILD)/debian/rootfs
export COCOON_DEBIAN_OCI_IMAGE := $(BUILD)/debian-oci.tar
export COCOON_DEBIAN_DOCKER_IMAGE := $(BUILD)/debian-docker.tar

.PHONY: fuzz all deps kernel agent initramfs rootfs debian-image vmm cocoon demo test bench soak lint clean \
	install uninstall

all: kernel initramfs rootfs vmm cocoon

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

kernel: deps
	@mkdir -p $(BUILD)
	@vmlinux=$$(guest-kernel/build.sh) && ln -sfn "$$vmlinux" $(BUILD)/vmlinux && echo "kernel: $$vmlinux"

agent:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile agent -p cocoon-agent --target $(AGENT_TARGET)

initramfs: deps agent
	@mkdir -p $(BUILD)
	@guest-kernel/build-initramfs.sh $(AGENT_BIN) $(BUILD)/initramfs.cpio >/dev/null && echo "initramfs: $(BUILD)/initramfs.cpio"

# The test root filesystem: Debian's busybox-static as an EROFS image, and as an OCI image
# archive for the engines (podman load, ctr image import).
rootfs: deps
	@images/build-busybox-rootfs.sh $(BUILD)/busybox-rootfs $(COCOON_ROOTFS) && echo "rootfs: $(COCOON_ROOTFS)"
	@images/build-busybox-oci.sh $(BUILD)/busybox-rootfs $(COCOON_OCI_IMAGE) && echo "image: $(COCOON_OCI_IMAGE)"

# The Debian test image: bookworm minbase (debootstrap, cached under COCOON_CACHE like the
# kernel) plus python3-minimal and nginx-light, as a two-layer OCI archive (podman load,
# ctr image import) and a Docker archive (docker load).
debian-image: deps
	@images/build-debian-rootfs.sh $(BUILD)/debian >/dev/null
	@images/build-debian-oci.sh $(BUILD)/debian/minbase $(COCOON_DEBIAN_ROOTFS) \
		$(COCOON_DEBIAN_OCI_IMAGE) $(COCOON_DEBIAN_DOCKER_IMAGE) && echo "image: $(COCOON_DEBIAN_OCI_IMAGE)"

vmm:
	cargo build --release -p cocoon-vmm

# The runtime finds its kernel and initramfs in ../lib/cocoon next to its binary.
cocoon: kernel initramfs
	cargo build --release -p cocoon-shim
	@mkdir -p target/lib/cocoon && ln -sfn $(COCOON_KERNEL) target/lib/cocoon/vmlinux \
		&& ln -sfn $(COCOON_INITRD) target/lib/cocoon/initramfs.cpio

demo: kernel initramfs rootfs cocoon
	@images/make-bundle.sh $(COCOON_BIN) $(BUILD)/demo-bundle $(COCOON_BUSYBOX_DIR) \
		sh -c 'echo "hello from a cocoon microVM: guest kernel $$(uname -r), host kernel '"$$(uname -r)"'"'
	@echo "cocoon run: the container's microVM is restored from a template; the first run boots one and saves it (about 20 s on a PVM host, where guest kernel code is emulated)..."
	@$(COCOON_BIN) --root $(BUILD)/run delete --force demo
	$(COCOON_BIN) --root $(BUILD)/run run --bundle $(BUILD)/demo-bundle demo
	@$(COCOON_BIN) --root $(BUILD)/run delete demo

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# After the tests, a short soak (the full one is `make soak`): cycles in parallel, then
# nothing may be left behind.
SOAK_CI_ARGS ?= --cycles 8 --parallel 2
test: kernel initramfs rootfs debian-image vmm cocoon lint
	cargo test --workspace -- --nocapture
	python3 bench/soak.py $(SOAK_CI_ARGS)

bench: kernel initramfs rootfs debian-image vmm cocoon
	python3 bench/boot.py
	python3 bench/vsock.py
	python3 bench/net.py
	python3 bench/network.py
	python3 bench/volumes.py
	python3 bench/agent.py
	python3 bench/snapshot.py
	python3 bench/runtime.py
	python3 bench/template.py
	python3 bench/concurrency.py

# Not in CI (it takes long): CYCLES create/start/delete cycles, PARALLEL at once, then nothing
# may be left behind (bench/soak.py).
SOAK_ARGS ?= --cycles 200 --parallel 8
soak: kernel initramfs rootfs vmm cocoon
	python3 bench/soak.py $(SOAK_ARGS)

# Not in CI: every fuzz target for FUZZ_SECONDS each, one after the other (docs/fuzzing.md).
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
FUZZ_SECONDS ?= 600
VMM_FUZZ_TARGETS := vsock_packet blk_request net_header mmio_transport vsock_muxer fuse_requests
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	set -e; for t in $(VMM_FUZZ_TARGETS); do \
		mkdir -p vmm/fuzz/corpus/$$t; \
		(cd vmm/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -O $$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1); \
	done
	mkdir -p agent/protocol/fuzz/corpus/agent_frames
	cd agent/protocol/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -O agent_frames \
		corpus/agent_frames seeds/agent_frames -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

# Install like a runtime: the binaries in $(PREFIX)/bin, the kernel and initramfs where the
# runtime looks beside its binary ($(PREFIX)/lib/cocoon). No configuration is written: engines
# are set up by hand (docs/docker.md, docs/podman.md, docs/containerd.md). install(1) replaces
# files by unlinking them first, so running VMs keep the images they mapped.
PREFIX ?= /usr/local
INSTALL_BIN = $(DESTDIR)$(PREFIX)/bin
INSTALL_LIB = $(DESTDIR)$(PREFIX)/lib/cocoon

install: vmm cocoon
	install -d $(INSTALL_BIN) $(INSTALL_LIB)
	install -m 0755 $(COCOON_BIN) $(VMM_BIN) $(INSTALL_BIN)/
	install -m 0644 $(COCOON_KERNEL) $(INSTALL_LIB)/vmlinux
	install -m 0644 $(COCOON_INITRD) $(INSTALL_LIB)/initramfs.cpio

uninstall:
	rm -f $(INSTALL_BIN)/cocoon $(INSTALL_BIN)/cocoon-vmm \
		$(INSTALL_LIB)/vmlinux $(INSTALL_LIB)/initramfs.cpio
	@[ ! -d $(INSTALL_LIB) ] || rmdir --ignore-fail-on-non-empty $(INSTALL_LIB)

clean:
	rm -rf $(BUILD) target
