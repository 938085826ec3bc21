# simg: build, test, demo and install. `make demo` and `make test` install what is missing first.
PREFIX ?= /usr/local
SWIFT ?= swift

.PHONY: all build release deps demo test install clean bench fuzz

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	$(SWIFT) build

# A static executable (the Swift runtime, libc, libstdc++, zlib, zstd, libdeflate and libaio linked in): no
# dynamic loader at start, so a run starts in about 0.7 ms of CPU instead of 4 (mapping,
# relocating and binding a dozen shared libraries), which was most of a `measure` or of a map of
# a small image. The static archives come with the -dev packages `make deps` installs.
release: deps
	$(SWIFT) build -c release --static-swift-stdlib -Xswiftc -static-executable

# Builds the release binary, makes a sample qcow2 image with real content and shows simg at work.
demo: release
	@bash scripts/demo.sh

# Every test: unit tests and the interoperability tests against qemu-img/qemu-io. The tests run
# the debug simg binary built beside them.
test: deps
	$(SWIFT) build
	$(SWIFT) build --build-tests
	scripts/test.sh

install: release
	install -d "$(DESTDIR)$(PREFIX)/bin"
	install -m 755 .build/release/simg "$(DESTDIR)$(PREFIX)/bin/simg"

clean:
	rm -rf .build

bench: release
	@if [ -f scripts/bench.sh ]; then bash scripts/bench.sh; \
	else echo "No benchmarks yet: they arrive with the convert command (scripts/bench.sh)."; fi

# Fuzzes the read path with libFuzzer for FUZZ_SECONDS (default 300): builds Fuzz/ with
# -sanitize=fuzzer, makes a seed corpus with qemu-img, reports executions, corpus and crashes.
fuzz: deps
	@bash scripts/fuzz.sh
