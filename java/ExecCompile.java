/*
 * ExecCompile: compiles many test classes in one JVM with javax.tools.JavaCompiler, for the
 * execution harness of issue 30 (docs/execution.md, "Compiling"). execute.py compiles it once
 * into data/cache/exec/helpers-<hash>/ and runs it as
 *
 *     java -cp data/cache/exec/helpers-<hash> ExecCompile THREADS < jobs
 *
 * Input, one tab-separated line each; CP, SP and OPT apply to the JOB lines after them:
 *     CP   <classpath>             the classpath (File.pathSeparator between entries)
 *     SP   <sourcepath>            the source path: the test tree's helpers compile on demand
 *     OPT  <option> ...            extra javac options (e.g. --release 11)
 *     JOB  <id> <outdir> <file>... one compilation: its sources, class files into outdir
 * Output, one line per job in the order they finish:
 *     OK   <id>
 *     ERR  <id> <line> <message>   the first error (preferably in the first file): its line
 *                                  and javac's text on one line
 * All jobs are first parsed, many files to one javac task: a file with a syntax error gets javac's
 * parse error at once, without the far costlier full compilation (whose parse it would fail the
 * same way). Annotation processing is always off (-proc:none): generated code is compiled, never
 * run here.
 */

import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import com.sun.source.util.JavacTask;
import javax.tools.Diagnostic;
import javax.tools.DiagnosticCollector;
import javax.tools.JavaCompiler;
import javax.tools.JavaFileObject;
import javax.tools.StandardJavaFileManager;
import javax.tools.StandardLocation;
import javax.tools.ToolProvider;

public final class ExecCompile {
    private static final JavaCompiler JAVAC = ToolProvider.getSystemJavaCompiler();
    private static final PrintStream OUT =
            new PrintStream(System.out, true, StandardCharsets.UTF_8);
    private static final List<String> ALWAYS = List.of("-proc:none", "-implicit:class", "-nowarn",
            "-Xlint:none", "-encoding", "UTF-8", "-g");
    /** Files parsed by one javac task in the first pass. */
    private static final int PARSE_CHUNK = 50;

    /** One compilation: the settings in force when its JOB line was read. */
    private static final class Job {
        String id;
        String outDir;
        List<String> files;
        String classpath;
        String sourcepath;
        List<String> options;
    }

    /** One file manager per worker thread, kept across jobs so that jar indexes are read once. */
    private static final ThreadLocal<Worker> WORKER = ThreadLocal.withInitial(Worker::new);

    private static final class Worker {
        StandardJavaFileManager files = JAVAC.getStandardFileManager(null, Locale.ROOT,
                StandardCharsets.UTF_8);
        String classpath = null;
        String sourcepath = null;
    }

    public static void main(String[] args) throws Exception {
        int threads = args.length > 0 ? Integer.parseInt(args[0]) : 1;
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Job> jobs = readJobs();
        // first pass: parse; the jobs that parse are compiled in the second
        List<Future<List<Job>>> parsed = new ArrayList<>();
        int from = 0;
        while (from < jobs.size()) {
            int to = from + 1;
            while (to < jobs.size() && to - from < PARSE_CHUNK
                    && jobs.get(to).options.equals(jobs.get(from).options)) {
                to += 1;
            }
            List<Job> chunk = jobs.subList(from, to);
            parsed.add(pool.submit(() -> parseOnly(chunk)));
            from = to;
        }
        for (Future<List<Job>> survivors : parsed) {
            for (Job job : survivors.get()) {
                pool.submit(() -> report(job));
            }
        }
        pool.shutdown();
        pool.awaitTermination(365, TimeUnit.DAYS);
    }

    private static List<Job> readJobs() throws Exception {
        List<Job> jobs = new ArrayList<>();
        BufferedReader in = new BufferedReader(
                new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String classpath = "";
        String sourcepath = "";
        List<String> options = new ArrayList<>();
        String line;
        while ((line = in.readLine()) != null) {
            String[] f = line.split("\t", -1);
            if (f[0].equals("CP")) {
                classpath = f[1];
            } else if (f[0].equals("SP")) {
                sourcepath = f[1];
            } else if (f[0].equals("OPT")) {
                options = new ArrayList<>(Arrays.asList(f).subList(1, f.length));
            } else if (f[0].equals("JOB")) {
                Job job = new Job();
                job.id = f[1];
                job.outDir = f[2];
                job.files = Arrays.asList(f).subList(3, f.length);
                job.classpath = classpath;
                job.sourcepath = sourcepath;
                job.options = options;
                jobs.add(job);
            }
        }
        return jobs;
    }

    /** The jobs of `chunk` whose files parse; the others are answered with their parse error. */
    private static List<Job> parseOnly(List<Job> chunk) {
        List<String> files = new ArrayList<>();
        for (Job job : chunk) {
            files.addAll(job.files);
        }
        DiagnosticCollector<JavaFileObject> diags = new DiagnosticCollector<>();
        try {
            StandardJavaFileManager fm = WORKER.get().files;
            // every file's errors count: javac reports 100 a task by default
            List<String> opts = new ArrayList<>(ALWAYS);
            opts.addAll(List.of("-Xmaxerrs", "1000000"));
            opts.addAll(chunk.get(0).options);
            Iterable<? extends JavaFileObject> units = fm.getJavaFileObjectsFromStrings(files);
            ((JavacTask) JAVAC.getTask(null, fm, diags, opts, null, units)).parse();
        } catch (Throwable e) {
            // no verdict from this pass: every job of the chunk is compiled in full
            return chunk;
        }
        List<Job> survivors = new ArrayList<>();
        for (Job job : chunk) {
            List<Diagnostic<? extends JavaFileObject>> own = new ArrayList<>();
            for (Diagnostic<? extends JavaFileObject> d : diags.getDiagnostics()) {
                if (d.getKind() == Diagnostic.Kind.ERROR && d.getSource() != null
                        && job.files.contains(new File(d.getSource().toUri()).getPath())) {
                    own.add(d);
                }
            }
            if (own.isEmpty()) {
                survivors.add(job);
            } else {
                synchronized (OUT) {
                    OUT.println("ERR\t" + job.id + "\t" + firstError(own, job.files.get(0)));
                }
            }
        }
        return survivors;
    }

    private static void report(Job job) {
        String result;
        try {
            result = compile(job);
        } catch (Throwable e) {
            result = "ERR\t" + job.id + "\t0\tcompiler crashed: " + oneLine(e.toString());
        }
        synchronized (OUT) {
            OUT.println(result);
        }
    }

    private static List<File> path(String text) {
        List<File> out = new ArrayList<>();
        for (String p : text.split(File.pathSeparator)) {
            if (!p.isEmpty()) {
                out.add(new File(p));
            }
        }
        return out;
    }

    private static String compile(Job job) throws Exception {
        Worker w = WORKER.get();
        // a new location empties the file manager's caches: set it only when it changes
        if (!job.classpath.equals(w.classpath)) {
            w.files.setLocation(StandardLocation.CLASS_PATH, path(job.classpath));
            w.classpath = job.classpath;
        }
        if (!job.sourcepath.equals(w.sourcepath)) {
            w.files.setLocation(StandardLocation.SOURCE_PATH, path(job.sourcepath));
            w.sourcepath = job.sourcepath;
        }
        w.files.setLocation(StandardLocation.CLASS_OUTPUT, List.of(new File(job.outDir)));
        List<String> opts = new ArrayList<>(ALWAYS);
        opts.addAll(List.of("-Xmaxerrs", "5"));
        opts.addAll(job.options);
        Iterable<? extends JavaFileObject> units = w.files.getJavaFileObjectsFromStrings(job.files);
        DiagnosticCollector<JavaFileObject> diags = new DiagnosticCollector<>();
        Boolean ok = JAVAC.getTask(null, w.files, diags, opts, null, units).call();
        if (ok) {
            return "OK\t" + job.id;
        }
        return "ERR\t" + job.id + "\t" + firstError(diags.getDiagnostics(), job.files.get(0));
    }

    /** "<line>\t<message>" of the first error, preferring one in the job's first file. */
    private static String firstError(List<Diagnostic<? extends JavaFileObject>> diags,
            String first) {
        Diagnostic<? extends JavaFileObject> pick = null;
        String firstName = new File(first).getName();
        for (Diagnostic<? extends JavaFileObject> d : diags) {
            if (d.getKind() != Diagnostic.Kind.ERROR) {
                continue;
            }
            boolean inFirst = d.getSource() != null
                    && new File(d.getSource().getName()).getName().equals(firstName);
            if (pick == null || (inFirst && pick.getSource() != null
                    && !new File(pick.getSource().getName()).getName().equals(firstName))) {
                pick = d;
            }
        }
        if (pick == null) {
            return "0\tjavac failed without an error message";
        }
        String where = pick.getSource() == null ? "" : new File(pick.getSource().getName())
                .getName() + ": ";
        long line = Math.max(0, pick.getLineNumber());
        return line + "\t" + oneLine(where + pick.getMessage(Locale.ROOT));
    }

    private static String oneLine(String text) {
        String flat = text.replaceAll("\\s+", " ").trim();
        return flat.length() > 300 ? flat.substring(0, 300) : flat;
    }
}
