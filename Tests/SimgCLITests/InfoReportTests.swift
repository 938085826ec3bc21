import ImageFormats
import Testing
@testable import SimgCLI

/// Expected texts are qemu-img 7.2's output for images with the same facts.
@Suite struct InfoReportTests {
    private func externalDataImage() -> ImageInfo {
        var info = ImageInfo(filename: "e.qcow2", format: "qcow2", virtualSize: 1_610_612_736)
        info.actualSize = 8_392_704
        info.clusterSize = 2_097_152
        info.dirtyFlag = true
        var specific = QCOW2SpecificInfo(compat: "1.1", refcountBits: 64)
        specific.compressionType = "zstd"
        specific.lazyRefcounts = true
        specific.corrupt = false
        specific.extendedL2 = true
        specific.dataFile = "d.raw"
        specific.dataFileRaw = true
        info.formatSpecific = specific.neutral
        return info
    }

    @Test func humanWithDataFileAndDirtyFlag() {
        let expected = """
            image: e.qcow2
            file format: qcow2
            virtual size: 1.5 GiB (1610612736 bytes)
            disk size: 8 MiB
            cluster_size: 2097152
            cleanly shut down: no
            Format specific information:
                compat: 1.1
                compression type: zstd
                lazy refcounts: true
                refcount bits: 64
                data file: d.raw
                data file raw: true
                corrupt: false
                extended l2: true

            """
        #expect(InfoReport.human(externalDataImage()) == expected)
    }

    @Test func jsonWithDataFileAndDirtyFlag() {
        let expected = """
            {
                "virtual-size": 1610612736,
                "filename": "e.qcow2",
                "cluster-size": 2097152,
                "format": "qcow2",
                "actual-size": 8392704,
                "format-specific": {
                    "type": "qcow2",
                    "data": {
                        "compat": "1.1",
                        "compression-type": "zstd",
                        "lazy-refcounts": true,
                        "refcount-bits": 64,
                        "data-file": "d.raw",
                        "data-file-raw": true,
                        "corrupt": false,
                        "extended-l2": true
                    }
                },
                "dirty-flag": true
            }

            """
        #expect(InfoReport.jsonText([externalDataImage()], chain: false) == expected)
    }

    private func backedImageWithSnapshot() -> ImageInfo {
        var info = ImageInfo(filename: "sub/t2.qcow2", format: "qcow2", virtualSize: 1_048_576)
        info.actualSize = 339_968
        info.clusterSize = 65536
        info.dirtyFlag = false
        info.backingFilename = "../base.qcow2"
        info.fullBackingFilename = "sub/../base.qcow2"
        info.backingFilenameFormat = "qcow2"
        info.snapshots = [
            SnapshotInfo(id: "1", name: "s1", vmStateSize: 0, dateSeconds: 1_795_238_306,
                         dateNanoseconds: 941_226_000, vmClockNanoseconds: 0, icount: 0),
            SnapshotInfo(id: "2", name: "snapshot-with-a-long-name-here", vmStateSize: 0,
                         dateSeconds: 1_795_238_306, dateNanoseconds: 947_156_000,
                         vmClockNanoseconds: 0, icount: nil),
        ]
        var specific = QCOW2SpecificInfo(compat: "0.10", refcountBits: 16)
        specific.compressionType = nil  // qemu-img still says zlib
        info.formatSpecific = specific.neutral
        return info
    }

    @Test func humanWithBackingAndSnapshots() {
        let date = TextFormat.localDate(seconds: 1_795_238_306)
        let expected = """
            image: sub/t2.qcow2
            file format: qcow2
            virtual size: 1 MiB (1048576 bytes)
            disk size: 332 KiB
            cluster_size: 65536
            backing file: ../base.qcow2 (actual path: sub/../base.qcow2)
            backing file format: qcow2
            Snapshot list:
            ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
            1         s1                    0 B \(date) 00:00:00.000          0
            2         snapshot-with-a-long-name-here      0 B \(date) 00:00:00.000\(String(repeating: " ", count: 11))
            Format specific information:
                compat: 0.10
                compression type: zlib
                refcount bits: 16

            """
        #expect(InfoReport.human(backedImageWithSnapshot()) == expected)
    }

    @Test func jsonWithBackingAndSnapshots() {
        let expected = """
            {
                "backing-filename-format": "qcow2",
                "snapshots": [
                    {
                        "icount": 0,
                        "vm-clock-nsec": 0,
                        "name": "s1",
                        "date-sec": 1795238306,
                        "date-nsec": 941226000,
                        "vm-clock-sec": 0,
                        "id": "1",
                        "vm-state-size": 0
                    },
                    {
                        "vm-clock-nsec": 0,
                        "name": "snapshot-with-a-long-name-here",
                        "date-sec": 1795238306,
                        "date-nsec": 947156000,
                        "vm-clock-sec": 0,
                        "id": "2",
                        "vm-state-size": 0
                    }
                ],
                "virtual-size": 1048576,
                "filename": "sub/t2.qcow2",
                "cluster-size": 65536,
                "format": "qcow2",
                "actual-size": 339968,
                "format-specific": {
                    "type": "qcow2",
                    "data": {
                        "compat": "0.10",
                        "compression-type": "zlib",
                        "refcount-bits": 16
                    }
                },
                "full-backing-filename": "sub/../base.qcow2",
                "backing-filename": "../base.qcow2",
                "dirty-flag": false
            }

            """
        #expect(InfoReport.jsonText([backedImageWithSnapshot()], chain: false) == expected)
    }

    @Test func rawAndChains() {
        var raw = ImageInfo(filename: "empty", format: "raw", virtualSize: 0)
        raw.actualSize = 0
        raw.dirtyFlag = false
        #expect(InfoReport.human(raw) == "image: empty\nfile format: raw\nvirtual size: 0 B (0 bytes)\ndisk size: 0 B\n")
        let json = """
            {
                "virtual-size": 0,
                "filename": "empty",
                "format": "raw",
                "actual-size": 0,
                "dirty-flag": false
            }

            """
        #expect(InfoReport.jsonText([raw], chain: false) == json)
        // A chain is an array in JSON and blank-line separated in human form.
        let chainJSON = InfoReport.jsonText([raw, raw], chain: true)
        #expect(chainJSON.hasPrefix("[\n    {\n        \"virtual-size\": 0,\n"))
        #expect(chainJSON.hasSuffix("        \"dirty-flag\": false\n    }\n]\n"))
        #expect(InfoReport.humanText([raw, raw]) == InfoReport.human(raw) + "\n" + InfoReport.human(raw))
        #expect(InfoReport.jsonText([raw], chain: true).hasPrefix("[\n"))
    }

    @Test func unknownDiskSizeAndBackingPath() {
        var info = ImageInfo(filename: "x", format: "qcow2", virtualSize: 512)
        info.backingFilename = "b"
        info.encrypted = true
        #expect(InfoReport.human(info) == """
            image: x
            file format: qcow2
            virtual size: 512 B (512 bytes)
            disk size: unavailable
            encrypted: yes
            backing file: b (cannot determine actual path)

            """)
    }

    @Test func bitmapsDump() {
        var info = ImageInfo(filename: "b.qcow2", format: "qcow2", virtualSize: 1_048_576)
        info.actualSize = 225_280
        info.clusterSize = 65536
        info.dirtyFlag = false
        var specific = QCOW2SpecificInfo(compat: "1.1", refcountBits: 16)
        specific.compressionType = "zlib"
        specific.lazyRefcounts = false
        specific.corrupt = false
        specific.extendedL2 = false
        specific.bitmaps = [BitmapInfo(name: "bm1", granularity: 65536, flags: ["auto"]),
                            BitmapInfo(name: "bm2", granularity: 131072, flags: [])]
        info.formatSpecific = specific.neutral
        #expect(InfoReport.human(info).hasSuffix("""
            Format specific information:
                compat: 1.1
                compression type: zlib
                lazy refcounts: false
                bitmaps:
                    [0]:
                        flags:
                            [0]: auto
                        name: bm1
                        granularity: 65536
                    [1]:
                        flags:
                        name: bm2
                        granularity: 131072
                refcount bits: 16
                corrupt: false
                extended l2: false

            """))
        #expect(InfoReport.jsonText([info], chain: false).contains("""
                        "bitmaps": [
                            {
                                "flags": [
                                    "auto"
                                ],
                                "name": "bm1",
                                "granularity": 65536
                            },
                            {
                                "flags": [
                                ],
                                "name": "bm2",
                                "granularity": 131072
                            }
                        ],
            """))
    }
}
