/*
 * ExecRunner: runs test methods with the JUnit Platform, each candidate in its own class
 * loader, for the execution harness of issue 30 (docs/execution.md, "Running"). execute.py
 * starts it inside the sandbox, one JVM for a batch of candidates:
 *
 *     java [-javaagent:jacocoagent.jar=...] -Dexec.project.path=<project's classes>
 *          -cp <helpers>:<test libraries and dependencies> ExecRunner JOBS < nonce
 *
 * JOBS holds one tab-separated line per test to run:
 *     <index> <class dir> <class name> <method name> <focal class> <focal method>
 * (the focal method of a constructor is "<init>"). A candidate's loader holds its class folder
 * and the project's own classes (exec.project.path), so that a test in a package of the project
 * reaches its package-private members; JUnit and the dependencies are shared. The first line of
 * standard input is a nonce that opens every line this program writes to standard output as it
 * was at startup:
 *     <nonce> START <index>
 *     <nonce> END <index> <status> <covered> <reason>
 * status: passed, failed, skipped or notest; covered: yes, no or na (no coverage agent, or the
 * focal method not found in its class file). Output the tests print goes to standard error.
 * A test that kills the JVM leaves a START without an END: execute.py reruns the rest.
 */

import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.lang.reflect.Method;
import java.net.URL;
import java.net.URLClassLoader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.List;
import org.junit.platform.engine.DiscoverySelector;
import org.junit.platform.engine.TestExecutionResult;
import org.junit.platform.engine.discovery.DiscoverySelectors;
import org.junit.platform.launcher.Launcher;
import org.junit.platform.launcher.LauncherDiscoveryRequest;
import org.junit.platform.launcher.TestExecutionListener;
import org.junit.platform.launcher.TestIdentifier;
import org.junit.platform.launcher.core.LauncherDiscoveryRequestBuilder;
import org.junit.platform.launcher.core.LauncherFactory;

public final class ExecRunner {
    /** The loader of one candidate: its test classes and the project's classes. */
    public static final class CandidateLoader extends URLClassLoader {
        CandidateLoader(URL[] urls, ClassLoader parent) {
            super(urls, parent);
        }
    }

    /** What JUnit reported for one test method. */
    static final class Outcome implements TestExecutionListener {
        int tests = 0;
        int skipped = 0;
        String failure = null;

        @Override
        public void executionSkipped(TestIdentifier id, String reason) {
            skipped += 1;
            if (failure == null) {
                failure = "skipped: " + reason;
            }
        }

        @Override
        public void executionFinished(TestIdentifier id, TestExecutionResult result) {
            if (id.isTest()) {
                tests += 1;
            }
            if (result.getStatus() == TestExecutionResult.Status.SUCCESSFUL) {
                return;
            }
            if (failure == null) {
                Throwable t = result.getThrowable().orElse(null);
                failure = result.getStatus().name().toLowerCase() + ": "
                        + (t == null ? "no exception" : describe(t));
            }
        }
    }

    private static PrintStream protocol;
    private static String nonce;

    public static void main(String[] args) throws Exception {
        // the protocol keeps the real standard output; the tests print to standard error
        protocol = new PrintStream(new FileOutputStream(FileDescriptor.out), true,
                StandardCharsets.UTF_8);
        System.setOut(System.err);
        BufferedReader stdin = new BufferedReader(
                new InputStreamReader(System.in, StandardCharsets.UTF_8));
        nonce = stdin.readLine();
        List<String> jobs = Files.readAllLines(Paths.get(args[0]), StandardCharsets.UTF_8);
        Launcher launcher = LauncherFactory.create();
        Object coverage = coverageChecker();
        for (String line : jobs) {
            if (!line.isBlank()) {
                runJob(launcher, coverage, line.split("\t", -1));
            }
        }
        protocol.flush();
        // a test may leave threads or shutdown hooks behind: none of them may hold the JVM
        Runtime.getRuntime().halt(0);
    }

    private static void runJob(Launcher launcher, Object coverage, String[] job)
            throws Exception {
        String index = job[0];
        protocol.println(nonce + " START " + index);
        resetCoverage();
        String status;
        String reason = "";
        String covered = "na";
        boolean fatal = false;
        ClassLoader parent = ExecRunner.class.getClassLoader();
        List<URL> urls = new ArrayList<>();
        urls.add(new File(job[1]).toURI().toURL());
        urls.addAll(paths(System.getProperty("exec.project.path", "")));
        try (CandidateLoader loader = new CandidateLoader(urls.toArray(new URL[0]), parent)) {
            Outcome outcome = runMethod(launcher, loader, job[2], job[3]);
            if (outcome == null) {
                status = "notest";
                reason = "no method " + job[3] + " in " + job[2];
            } else if (outcome.failure != null) {
                status = outcome.skipped > 0 && outcome.tests == 0 ? "skipped" : "failed";
                reason = outcome.failure;
            } else if (outcome.tests == 0) {
                status = "notest";
                reason = "JUnit ran no test: not annotated as a test?";
            } else {
                status = "passed";
                covered = focalCovered(coverage, loader, job[4], job[5]);
            }
        } catch (Throwable e) {
            status = "failed";
            reason = "outside the test: " + describe(e);
            fatal = e instanceof VirtualMachineError;
        }
        protocol.println(nonce + " END " + index + " " + status + " " + covered + " "
                + oneLine(reason));
        // out of memory (JUnit lets it through): the tests after it get a fresh JVM
        if (fatal) {
            protocol.flush();
            Runtime.getRuntime().halt(3);
        }
    }

    /** JUnit's outcome for every method of that name in the class; null when there is none. */
    private static Outcome runMethod(Launcher launcher, ClassLoader loader, String className,
            String methodName) throws Exception {
        Class<?> cls = Class.forName(className, false, loader);
        List<DiscoverySelector> selectors = new ArrayList<>();
        for (Method m : cls.getDeclaredMethods()) {
            if (m.getName().equals(methodName)) {
                selectors.add(DiscoverySelectors.selectMethod(cls, m));
            }
        }
        if (selectors.isEmpty()) {
            return null;
        }
        LauncherDiscoveryRequest request =
                LauncherDiscoveryRequestBuilder.request().selectors(selectors).build();
        Outcome outcome = new Outcome();
        Thread current = Thread.currentThread();
        ClassLoader before = current.getContextClassLoader();
        current.setContextClassLoader(loader);
        try {
            launcher.execute(request, outcome);
        } finally {
            current.setContextClassLoader(before);
        }
        return outcome;
    }

    /** The JaCoCo agent's IAgent, or null when the JVM runs without it. */
    private static Object agent() {
        try {
            return Class.forName("org.jacoco.agent.rt.RT").getMethod("getAgent").invoke(null);
        } catch (Throwable e) {
            return null;
        }
    }

    private static void resetCoverage() throws Exception {
        Object agent = agent();
        if (agent != null) {
            agent.getClass().getMethod("reset").invoke(agent);
        }
    }

    /**
     * ExecCoverage loaded with JaCoCo's analysis classes in a loader of their own, so that their
     * ASM never meets the one a project may bring; null without the agent.
     */
    private static Object coverageChecker() {
        String jars = System.getProperty("exec.coverage.path", "");
        if (agent() == null || jars.isEmpty()) {
            return null;
        }
        try {
            List<URL> urls = paths(jars);
            ClassLoader platform = ClassLoader.getPlatformClassLoader();
            URLClassLoader isolated = new URLClassLoader(urls.toArray(new URL[0]), platform);
            return isolated.loadClass("ExecCoverage").getConstructor().newInstance();
        } catch (Throwable e) {
            System.err.println("ExecRunner: no coverage check: " + describe(e));
            return null;
        }
    }

    /** "yes" / "no" for the focal method's instructions; "na" when that cannot be told. */
    private static String focalCovered(Object checker, ClassLoader classes, String focalClass,
            String focalMethod) throws Exception {
        Object agent = agent();
        if (checker == null || agent == null || focalClass.isEmpty()) {
            return "na";
        }
        Method dump = agent.getClass().getMethod("getExecutionData", boolean.class);
        byte[] exec = (byte[]) dump.invoke(agent, false);
        String resource = focalClass.replace('.', '/') + ".class";
        byte[] bytes;
        try (InputStream in = classes.getResourceAsStream(resource)) {
            if (in == null) {
                return "na";
            }
            ByteArrayOutputStream buf = new ByteArrayOutputStream();
            in.transferTo(buf);
            bytes = buf.toByteArray();
        }
        Method check = checker.getClass().getMethod("covered", byte[].class, byte[].class,
                String.class);
        return (String) check.invoke(checker, exec, bytes, focalMethod);
    }

    /** URLs of a path list (File.pathSeparator between entries). */
    private static List<URL> paths(String text) throws Exception {
        List<URL> urls = new ArrayList<>();
        for (String p : text.split(File.pathSeparator)) {
            if (!p.isEmpty()) {
                urls.add(new File(p).toURI().toURL());
            }
        }
        return urls;
    }

    private static String describe(Throwable t) {
        String text = t.getClass().getName();
        if (t.getMessage() != null) {
            text += ": " + t.getMessage();
        }
        if (t.getCause() != null && t.getCause() != t) {
            text += " (caused by " + t.getCause().getClass().getName() + ": "
                    + t.getCause().getMessage() + ")";
        }
        return text;
    }

    private static String oneLine(String text) {
        String flat = text.replaceAll("\\s+", " ").trim();
        return flat.length() > 300 ? flat.substring(0, 300) : flat;
    }
}
