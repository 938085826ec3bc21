import DiskIO
import Glibc

/// One thread that runs jobs (an image's writes) in the order given, behind the thread that
/// submits them, so reading the next run overlaps writing the last one (commit's copy). The
/// jobs own the image they write: the submitter does not touch it until `drain`.
final class WriteBehind: @unchecked Sendable {
    // @unchecked Sendable: every field is guarded by `mutex` (the thread and pointers are
    // set once in init and only read afterwards).
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var jobs: [() throws -> Void] = []
    /// Jobs submitted and not finished (queued or running).
    private var outstanding = 0
    private var stopping = false
    private var failure: (any Error)?
    private var thread = pthread_t()

    init() throws {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(changed, nil)
        let box = Unmanaged.passRetained(self)
        let r = pthread_create(&thread, nil, { raw in
            // Sound: raw is the retained self passed below, released once here.
            let me = Unmanaged<WriteBehind>.fromOpaque(raw!).takeRetainedValue()
            me.work()
            return nil
        }, box.toOpaque())
        if r != 0 {
            box.release()
            throw ThreadStartError(code: r, thread: "the commit writer thread")
        }
    }

    deinit {
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(mutex)
        changed.deallocate()
        mutex.deallocate()
    }

    /// Queues `job`, then waits until at most `depth` jobs are outstanding (so the caller may
    /// reuse the buffer of the job before). Throws the first failure of any job.
    func submit(depth: Int = 1, _ job: @escaping () throws -> Void) throws {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if let failure { throw failure }
        jobs.append(job)
        outstanding += 1
        pthread_cond_broadcast(changed)
        while outstanding > depth && failure == nil { pthread_cond_wait(changed, mutex) }
        if let failure { throw failure }
    }

    /// Waits for every job; throws the first failure.
    func drain() throws {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while outstanding > 0 { pthread_cond_wait(changed, mutex) }
        if let failure { throw failure }
    }

    /// Waits for every job (their failures are dropped: the caller is failing already) and
    /// ends the thread.
    func finish() {
        pthread_mutex_lock(mutex)
        while outstanding > 0 { pthread_cond_wait(changed, mutex) }
        stopping = true
        pthread_cond_broadcast(changed)
        pthread_mutex_unlock(mutex)
        pthread_join(thread, nil)
    }

    private func work() {
        pthread_mutex_lock(mutex)
        while true {
            while jobs.isEmpty && !stopping { pthread_cond_wait(changed, mutex) }
            if jobs.isEmpty && stopping { break }
            let job = jobs.removeFirst()
            let skip = failure != nil
            pthread_mutex_unlock(mutex)
            var error: (any Error)?
            // After a failure the rest is not written (the commit fails anyway).
            if !skip { do { try job() } catch let e { error = e } }
            pthread_mutex_lock(mutex)
            if failure == nil, let error { failure = error }
            outstanding -= 1
            pthread_cond_broadcast(changed)
        }
        pthread_mutex_unlock(mutex)
    }
}
