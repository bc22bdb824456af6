// A real Apache Tribes GroupChannel for the interop tests (tests/java_interop.rs).
//
// Usage: TribesNode <port> <peer-host> <peer-port> <peer-unique-id-hex>
//        TribesNode mcast <group-port> <frequency-ms> <drop-time-ms>
//   (multicast membership on 127.0.0.1, TTL 0; prints "added <port> <id-hex>" and
//   "gone <port> <id-hex>" for membership changes)
// Prints "ready <port> <unique-id-hex>" once started, then one "recv <text>" line per byte
// message received. Reads commands on stdin:
//   send <options> <count> <prefix>   sends <prefix>-<i> to the peer, prints "sent <count> <errors>"
//   exit                              stops the channel and exits (so does end of input)
// A received message starting with "fail" makes the listener throw (FAIL_ACK for sync-ack).
// The process exits by itself after 120 s whatever happens.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.Serializable;
import java.nio.charset.StandardCharsets;

import org.apache.catalina.tribes.ByteMessage;
import org.apache.catalina.tribes.Channel;
import org.apache.catalina.tribes.ChannelException;
import org.apache.catalina.tribes.ChannelListener;
import org.apache.catalina.tribes.Member;
import org.apache.catalina.tribes.group.GroupChannel;
import org.apache.catalina.tribes.group.interceptors.MessageDispatchInterceptor;
import org.apache.catalina.tribes.group.interceptors.StaticMembershipInterceptor;
import org.apache.catalina.tribes.membership.StaticMember;
import org.apache.catalina.tribes.transport.ReceiverBase;

public class TribesNode {
    public static void main(String[] args) throws Exception {
        Thread limit = new Thread(() -> {
            try {
                Thread.sleep(120_000);
            } catch (InterruptedException e) {
                return;
            }
            System.exit(3);
        });
        limit.setDaemon(true);
        limit.start();

        if (args[0].equals("mcast")) {
            multicast(args);
            return;
        }
        int port = Integer.parseInt(args[0]);
        StaticMember peer = new StaticMember(args[1], Integer.parseInt(args[2]), 0, hex(args[3]));

        GroupChannel channel = new GroupChannel();
        channel.setHeartbeat(false);
        ReceiverBase receiver = (ReceiverBase) channel.getChannelReceiver();
        receiver.setAddress("127.0.0.1");
        receiver.setPort(port);
        receiver.setAutoBind(1);
        StaticMembershipInterceptor statics = new StaticMembershipInterceptor();
        statics.addStaticMember(peer);
        channel.addInterceptor(new MessageDispatchInterceptor());
        channel.addInterceptor(statics);
        channel.addChannelListener(new ChannelListener() {
            @Override
            public boolean accept(Serializable msg, Member sender) {
                return msg instanceof ByteMessage;
            }

            @Override
            public void messageReceived(Serializable msg, Member sender) {
                String text = new String(((ByteMessage) msg).getMessage(), StandardCharsets.ISO_8859_1);
                if (text.startsWith("fail")) {
                    throw new IllegalStateException("asked to fail");
                }
                synchronized (System.out) {
                    System.out.println("recv " + text);
                    System.out.flush();
                }
            }
        });
        channel.start(Channel.SND_RX_SEQ | Channel.SND_TX_SEQ);
        Member local = channel.getLocalMember(false);
        synchronized (System.out) {
            System.out.println("ready " + local.getPort() + " " + hexOf(local.getUniqueId()));
            System.out.flush();
        }

        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String[] p = line.trim().split(" ");
            if (p[0].equals("send") && p.length == 4) {
                int options = Integer.parseInt(p[1]);
                int count = Integer.parseInt(p[2]);
                int errors = 0;
                for (int i = 0; i < count; i++) {
                    byte[] body = (p[3] + "-" + i).getBytes(StandardCharsets.ISO_8859_1);
                    try {
                        channel.send(new Member[] { peer }, new ByteMessage(body), options);
                    } catch (ChannelException e) {
                        errors++;
                    }
                }
                synchronized (System.out) {
                    System.out.println("sent " + count + " " + errors);
                    System.out.flush();
                }
            } else if (p[0].equals("exit")) {
                break;
            }
        }
        channel.stop(Channel.DEFAULT);
        System.exit(0);
    }

    private static void multicast(String[] args) throws Exception {
        GroupChannel channel = new GroupChannel();
        channel.setHeartbeat(false);
        ReceiverBase receiver = (ReceiverBase) channel.getChannelReceiver();
        receiver.setAddress("127.0.0.1");
        receiver.setPort(43000 + (int) (ProcessHandle.current().pid() % 2000));
        receiver.setAutoBind(100);
        org.apache.catalina.tribes.membership.McastService mcast =
                (org.apache.catalina.tribes.membership.McastService) channel.getMembershipService();
        mcast.setAddress("228.0.0.4");
        mcast.setPort(Integer.parseInt(args[1]));
        mcast.setFrequency(Long.parseLong(args[2]));
        mcast.setDropTime(Long.parseLong(args[3]));
        mcast.setBind("127.0.0.1");
        mcast.setTtl(0);
        channel.addMembershipListener(new org.apache.catalina.tribes.MembershipListener() {
            @Override
            public void memberAdded(Member member) {
                say("added " + member.getPort() + " " + hexOf(member.getUniqueId()));
            }

            @Override
            public void memberDisappeared(Member member) {
                say("gone " + member.getPort() + " " + hexOf(member.getUniqueId()));
            }
        });
        channel.start(Channel.DEFAULT);
        Member local = channel.getLocalMember(false);
        say("ready " + local.getPort() + " " + hexOf(local.getUniqueId()));
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.trim().equals("exit")) {
                break;
            }
        }
        channel.stop(Channel.DEFAULT);
        System.exit(0);
    }

    private static void say(String s) {
        synchronized (System.out) {
            System.out.println(s);
            System.out.flush();
        }
    }

    private static byte[] hex(String s) {
        byte[] out = new byte[s.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }

    private static String hexOf(byte[] b) {
        StringBuilder sb = new StringBuilder();
        for (byte x : b) {
            sb.append(String.format("%02x", x & 0xff));
        }
        return sb.toString();
    }
}
